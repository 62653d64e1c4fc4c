//! Turning a conversation into the token ids the model sees.
//!
//! Shared by `minnow serve` and the CLI's `run --chat` and `chat`, so both
//! tokenize a conversation identically (the prefix cache depends on a chat's
//! earlier turns tokenizing the same way every time).

use minnow_engine::chat::{render_plain, ChatMessage};
use minnow_engine::loader::LoadedModel;

/// Renders `messages` with the model's chat template (ChatML when it has
/// none), ending with the assistant's turn header, and tokenizes the result
/// with special tokens parsed. A BOS is added only when the tokenizer asks
/// for one and the template did not already write it: a doubled BOS shifts
/// every logit of some models.
pub fn chat_prompt(m: &LoadedModel, messages: &[ChatMessage]) -> anyhow::Result<Vec<u32>> {
    let text = match &m.chat {
        Some(t) => t.render(messages, true)?,
        None => render_plain(messages, true),
    };
    let bos_text = m.tokenizer.bos_id().map(|b| m.tokenizer.token_text(b).to_string());
    let template_wrote_bos = bos_text.is_some_and(|b| !b.is_empty() && text.starts_with(&b));
    Ok(m.tokenizer.encode(&text, !template_wrote_bos, true)?)
}
