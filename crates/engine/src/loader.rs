//! Loading everything a GGUF file describes: the network, its tokenizer and
//! its chat template, with errors that name the file.

use crate::chat::ChatTemplate;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use minnow_gguf::GgufFile;
use std::path::Path;
use std::sync::Arc;

/// A model ready to run: weights, tokenizer and (optional) chat template.
pub struct LoadedModel {
    pub file: Arc<GgufFile>,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat: Option<ChatTemplate>,
}

impl LoadedModel {
    pub fn load(path: &Path) -> anyhow::Result<LoadedModel> {
        let file = Arc::new(GgufFile::open(path)?);
        let name = path.display();
        let tokenizer = Tokenizer::from_gguf(&file).map_err(|e| anyhow::anyhow!("{name}: tokenizer: {e}"))?;
        let chat = ChatTemplate::from_gguf(&file).map_err(|e| anyhow::anyhow!("{name}: chat template: {e}"))?;
        let model = Model::from_gguf(file.clone()).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        Ok(LoadedModel { file, model, tokenizer, chat })
    }
}
