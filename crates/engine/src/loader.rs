//! Loading everything a GGUF file describes: the network, its tokenizer and
//! its chat template, with errors that name the file; how a conversation
//! becomes the model's prompt ([`LoadedModel::chat_prompt`], the one place
//! that rule lives). Where model files are cached and how they are
//! fetched is `minnow_models`' business.

use crate::chat::{ChatMessage, ChatTemplate};
use crate::constraint::{Constraint, ConstraintEngine, ConstraintError, ConstraintSpec};
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use minnow_gguf::GgufFile;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// A model ready to run: weights, tokenizer and (optional) chat template.
pub struct LoadedModel {
    pub file: Arc<GgufFile>,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat: Option<ChatTemplate>,
    /// Compiles structured-output constraints for this vocabulary; built
    /// on first use ([`LoadedModel::constraints`]).
    constraints: OnceLock<Result<ConstraintEngine, String>>,
}

impl LoadedModel {
    /// The constraint compiler for this model's vocabulary, built on first
    /// use (a token trie of the vocabulary and llguidance's parser factory).
    pub fn constraints(&self) -> Result<&ConstraintEngine, ConstraintError> {
        let engine = self.constraints.get_or_init(|| {
            let own = Tokenizer::from_gguf(&self.file).map_err(|e| e.to_string())?;
            ConstraintEngine::new(&self.tokenizer, own).map_err(|e| e.to_string())
        });
        engine.as_ref().map_err(|e| ConstraintError(e.clone()))
    }

    /// Compiles `spec` against this model's vocabulary.
    pub fn compile_constraint(&self, spec: &ConstraintSpec) -> Result<Constraint, ConstraintError> {
        self.constraints()?.compile(spec)
    }

    /// Renders `messages` with the model's chat template (ChatML when it
    /// has none), ending with the assistant's turn header, and tokenizes the
    /// result with special tokens parsed. A BOS is added only when the
    /// tokenizer asks for one and the template did not already write it: a
    /// doubled BOS shifts every logit of some models. `serve`, `run --chat`,
    /// `chat` and the distill teachers and evaluations all build prompts
    /// here, so a conversation tokenizes the same way everywhere (the prefix
    /// cache depends on it).
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> anyhow::Result<Vec<u32>> {
        self.chat_prompt_with_tools(messages, None)
    }

    /// [`chat_prompt`](Self::chat_prompt) offering the model `tools` through
    /// its template's tools section (see [`crate::tools`] for a template
    /// without one).
    pub fn chat_prompt_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
    ) -> anyhow::Result<Vec<u32>> {
        let text = crate::tools::render_conversation(self.chat.as_ref(), messages, tools, true)?;
        let bos_text = self.tokenizer.bos_id().map(|b| self.tokenizer.token_text(b).to_string());
        let template_wrote_bos = bos_text.is_some_and(|b| !b.is_empty() && text.starts_with(&b));
        Ok(self.tokenizer.encode(&text, !template_wrote_bos, true)?)
    }

    pub fn load(path: &Path) -> anyhow::Result<LoadedModel> {
        let file = Arc::new(GgufFile::open(path)?);
        let name = path.display();
        let tokenizer = Tokenizer::from_gguf(&file).map_err(|e| anyhow::anyhow!("{name}: tokenizer: {e}"))?;
        let chat = ChatTemplate::from_gguf(&file).map_err(|e| anyhow::anyhow!("{name}: chat template: {e}"))?;
        let model = Model::from_gguf(file.clone()).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        Ok(LoadedModel { file, model, tokenizer, chat, constraints: OnceLock::new() })
    }
}
