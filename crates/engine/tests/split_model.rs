//! A model split into parts (llama.cpp's `gguf-split` layout) loads through
//! the engine's loader as the model it was: SmolLM2 written as three parts,
//! loaded from its second part, tokenizes and generates greedily token for
//! token as the single file does.

mod common;

use minnow_engine::generate::{generate, GenerateParams};
use minnow_engine::loader::LoadedModel;
use minnow_engine::sampler::SamplingParams;
use minnow_gguf::GgufWriter;

/// A directory removed when dropped, so a failing test leaves no parts behind.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn smollm2_split_generates_as_the_single_file() {
    let path = common::model_path("smollm2-135m-instruct-q4_1.gguf");
    let single = LoadedModel::load(&path).unwrap_or_else(|e| panic!("{e}"));

    let dir = TempDir(std::env::temp_dir().join(format!("minnow-engine-split-model-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let parts = GgufWriter::from_file(&single.file).write_split(dir.0.join("smollm2"), 100).unwrap();
    assert_eq!(parts.len(), 3);
    // Any part names the whole model; the second shows it is not just the first.
    let split = LoadedModel::load(&parts[1]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(split.file.part_paths(), &parts[..]);
    assert_eq!(split.file.tensors().len(), single.file.tensors().len());

    let greedy = GenerateParams { max_tokens: 16, sampling: SamplingParams::greedy(), ..GenerateParams::default() };
    for text in ["Once upon a time, in a small village by the sea,", "The three primary colors are"] {
        let prompt = single.tokenizer.encode(text, true, false).unwrap();
        assert_eq!(split.tokenizer.encode(text, true, false).unwrap(), prompt, "{text:?}");
        let run = |m: &LoadedModel| {
            let mut cache = m.model.new_cache(256);
            generate(&m.model, &m.tokenizer, common::pool(), &mut cache, &prompt, &greedy, |_| {}).unwrap()
        };
        let (want, got) = (run(&single), run(&split));
        assert!(want.ids.len() >= 8, "{text:?}: only {} tokens generated", want.ids.len());
        assert_eq!(got.ids, want.ids, "{text:?}: the split model generated {:?}, the file {:?}", got.text, want.text);
        assert_eq!(got.text, want.text);
    }
}
