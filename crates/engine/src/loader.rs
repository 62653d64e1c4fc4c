//! Loading everything a GGUF file describes: the network, its tokenizer and
//! its chat template, with errors that name the file; how a conversation
//! becomes the model's prompt ([`LoadedModel::chat_prompt`], the one place
//! that rule lives); and where models are cached on this machine.

use crate::chat::{render_plain, ChatMessage, ChatTemplate};
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use minnow_gguf::GgufFile;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A model ready to run: weights, tokenizer and (optional) chat template.
pub struct LoadedModel {
    pub file: Arc<GgufFile>,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat: Option<ChatTemplate>,
}

impl LoadedModel {
    /// Renders `messages` with the model's chat template (ChatML when it
    /// has none), ending with the assistant's turn header, and tokenizes the
    /// result with special tokens parsed. A BOS is added only when the
    /// tokenizer asks for one and the template did not already write it: a
    /// doubled BOS shifts every logit of some models. `serve`, `run --chat`,
    /// `chat` and the distill teachers and evaluations all build prompts
    /// here, so a conversation tokenizes the same way everywhere (the prefix
    /// cache depends on it).
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> anyhow::Result<Vec<u32>> {
        let text = match &self.chat {
            Some(t) => t.render(messages, true)?,
            None => render_plain(messages, true),
        };
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
        Ok(LoadedModel { file, model, tokenizer, chat })
    }
}

/// Where models are cached (`minnow pull` puts them there; tests look there):
/// `$MINNOW_MODELS`, else `$XDG_CACHE_HOME/minnow/models`, else
/// `~/.cache/minnow/models`.
pub fn model_cache_dir() -> PathBuf {
    model_cache_dir_from(|key| std::env::var_os(key))
}

/// [`model_cache_dir`] with the environment passed in, so tests need not mutate it.
fn model_cache_dir_from(env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let set = |key| env(key).filter(|v| !v.is_empty());
    if let Some(dir) = set("MINNOW_MODELS") {
        return PathBuf::from(dir);
    }
    // The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    if let Some(xdg) = set("XDG_CACHE_HOME").map(PathBuf::from).filter(|p| p.is_absolute()) {
        return xdg.join("minnow/models");
    }
    let home = set("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/minnow/models")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |key| vars.iter().find(|(k, _)| *k == key).map(|(_, v)| OsString::from(v))
    }

    #[test]
    fn model_cache_dir_precedence() {
        let all = [("MINNOW_MODELS", "/m"), ("XDG_CACHE_HOME", "/x"), ("HOME", "/h")];
        assert_eq!(model_cache_dir_from(env_of(&all)), PathBuf::from("/m"));
        assert_eq!(model_cache_dir_from(env_of(&all[1..])), PathBuf::from("/x/minnow/models"));
        assert_eq!(model_cache_dir_from(env_of(&all[2..])), PathBuf::from("/h/.cache/minnow/models"));
        // Empty values count as unset; a relative XDG_CACHE_HOME is ignored, as the spec says.
        let empty = [("MINNOW_MODELS", ""), ("XDG_CACHE_HOME", ""), ("HOME", "/h")];
        assert_eq!(model_cache_dir_from(env_of(&empty)), PathBuf::from("/h/.cache/minnow/models"));
        let relative = [("XDG_CACHE_HOME", "rel"), ("HOME", "/h")];
        assert_eq!(model_cache_dir_from(env_of(&relative)), PathBuf::from("/h/.cache/minnow/models"));
    }
}
