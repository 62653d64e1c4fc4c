//! Smoke tests against the real models in `$MINNOW_MODELS` (default
//! `~/.cache/minnow/models/`): the parser against what real converters write.
//! These files are not in the repository (they are hundreds of megabytes);
//! the one a test needs is fetched on first use (`minnow_models`), and
//! `every_cached_model_parses` reads whatever else the cache holds.

use minnow_gguf::{GgmlType, GgufFile, Value};

/// Checks that hold for any well-formed model: every tensor's bytes are where
/// the table says, and the vocabulary arrays agree in length. A split model
/// (several parts) is checked part by part.
fn check_consistency(file: &GgufFile) {
    // Per part: where its last tensor ended.
    let mut prev_end = vec![0u64; file.part_paths().len().max(1)];
    for t in file.tensors() {
        let data = file.tensor_data(t);
        assert_eq!(data.len() as u64, t.n_bytes, "{}", t.name);
        assert_eq!(t.ty.bytes_for(t.n_elements()), Some(t.n_bytes), "{}", t.name);
        assert_eq!(t.offset % file.alignment(), 0, "{}", t.name);
        // Converters lay tensors out in table order without overlap.
        let part = file.tensor_part(&t.name).unwrap();
        assert!(t.offset >= prev_end[part], "{} overlaps the previous tensor", t.name);
        prev_end[part] = t.offset + t.n_bytes;
    }
    if let [single] = file.part_paths() {
        let size = std::fs::metadata(single).unwrap().len();
        assert_eq!(size, file.file_size());
        assert!(file.data_offset() + prev_end[0] <= size);
    } else {
        let mut total = 0;
        for (part, path) in file.part_paths().iter().enumerate() {
            let size = std::fs::metadata(path).unwrap().len();
            assert!(file.part_data_offset(part).unwrap() + prev_end[part] <= size, "{}", path.display());
            total += size;
        }
        assert_eq!(total, file.file_size());
    }
    let tokens = file.get("tokenizer.ggml.tokens").and_then(Value::as_array).expect("token list");
    assert!(tokens.iter().all(|t| t.as_str().is_some()));
    if let Some(types) = file.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        assert_eq!(types.len(), tokens.len());
    }
}

#[test]
fn smollm2_135m() {
    let path = minnow_models::test_model("smollm2-135m-instruct-q4_1.gguf");
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.tensors().len(), 272);
    assert_eq!(file.get("general.architecture").and_then(Value::as_str), Some("llama"));
    assert_eq!(file.get("llama.block_count").and_then(Value::as_u64), Some(30));
    assert_eq!(file.get("llama.embedding_length").and_then(Value::as_u64), Some(576));
    let q = file.tensor("blk.0.attn_q.weight").expect("blk.0.attn_q.weight");
    assert_eq!(q.dims, vec![576, 576]);
    assert_eq!(q.ty, GgmlType::Q4_1);
    assert_eq!(file.file_size(), std::fs::metadata(&path).unwrap().len());
    check_consistency(&file);
}

#[test]
fn every_cached_model_parses() {
    let dir = minnow_models::cache_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("skipping: {} not found", dir.display());
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "gguf") {
            continue;
        }
        let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let arch = file.get("general.architecture").and_then(Value::as_str).expect("architecture");
        let mut types: Vec<_> = file.tensors().iter().map(|t| t.ty.name()).collect();
        types.sort();
        types.dedup();
        eprintln!(
            "{}: v{}, {arch}, {} tensors ({}), {} metadata keys, alignment {}",
            path.file_name().unwrap().to_string_lossy(),
            file.version(),
            file.tensors().len(),
            types.join(" "),
            file.metadata().len(),
            file.alignment()
        );
        check_consistency(&file);
    }
}

/// Read a real model, write it back, read that: metadata and tensor bytes must
/// be identical. The smallest model keeps this to ~100 MB of temporary disk.
#[test]
fn smollm2_write_round_trip() {
    use minnow_gguf::GgufWriter;
    let path = minnow_models::test_model("smollm2-135m-instruct-q4_1.gguf");
    let original = GgufFile::open(&path).unwrap();
    let dir = std::env::temp_dir().join(format!("minnow-gguf-round-trip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy_path = dir.join("copy.gguf");
    GgufWriter::from_file(&original).write_file(&copy_path).unwrap();

    let copy = GgufFile::open(&copy_path).unwrap();
    assert_eq!(copy.metadata(), original.metadata());
    assert_eq!(copy.tensors(), original.tensors());
    for t in original.tensors() {
        assert!(copy.tensor_data(t) == original.tensor_data(t), "{}", t.name);
    }
    // Our layout (table order, each tensor padded to the alignment) is the one
    // the reference converter uses, so the copy is byte-for-byte the original.
    let same_bytes = std::fs::read(&copy_path).unwrap() == std::fs::read(&path).unwrap();
    drop(copy);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(same_bytes, "rewritten file differs from the original");
}
