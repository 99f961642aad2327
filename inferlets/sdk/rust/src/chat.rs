//! Chat prompts in ChatML, the format of SmolLM2, Qwen and many other instruct models:
//!
//! ```text
//! <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n
//! ```
//!
//! The host hands out the model's jinja template (`model_info.chat_template`) but the guest has
//! no jinja engine, so the SDK renders ChatML itself. Many ChatML templates insert a default
//! system message when the conversation has none (SmolLM2: "You are a helpful AI assistant
//! named SmolLM, trained by Hugging Face"); [`default_system_prompt`] finds that literal in
//! the template so the rendering matches the template's own.

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.to_string(), content: content.to_string() }
    }

    pub fn system(content: &str) -> Message {
        Message::new("system", content)
    }

    pub fn user(content: &str) -> Message {
        Message::new("user", content)
    }

    pub fn assistant(content: &str) -> Message {
        Message::new("assistant", content)
    }
}

const START: &str = "<|im_start|>";
const END: &str = "<|im_end|>";

/// Whether a chat template is ChatML.
pub fn is_chatml(template: &str) -> bool {
    template.contains(START) && template.contains(END)
}

/// The default system message a ChatML template inserts when the conversation has none: the
/// first literal `<|im_start|>system\n...<|im_end|>` block that is plain text (not built from
/// template expressions).
pub fn default_system_prompt(template: &str) -> Option<String> {
    let opening = format!("{}system", START);
    let mut rest = template;
    while let Some(found) = rest.find(&opening) {
        rest = &rest[found + opening.len()..];
        // The newline is a real one in some templates and an escaped `\n` in others.
        let body = if let Some(body) = rest.strip_prefix('\n') {
            body
        } else if let Some(body) = rest.strip_prefix("\\n") {
            body
        } else {
            continue;
        };
        let end = match body.find(END) {
            Some(end) => end,
            None => continue,
        };
        let text = &body[..end];
        let built_from_expressions = ["' +", "\" +", "{{", "{%"].iter().any(|m| text.contains(m));
        if !built_from_expressions {
            return Some(text.replace("\\n", "\n"));
        }
    }
    None
}

/// Render `messages` as ChatML, inserting `default_system` first when the conversation does not
/// start with a system message, and opening the assistant's turn when asked.
pub fn render_chatml(
    messages: &[Message],
    add_generation_prompt: bool,
    default_system: Option<&str>,
) -> String {
    let mut out = String::new();
    let has_system = messages.first().map_or(false, |m| m.role == "system");
    if let (false, Some(system)) = (has_system, default_system) {
        push_turn(&mut out, "system", system);
    }
    for message in messages {
        push_turn(&mut out, &message.role, &message.content);
    }
    if add_generation_prompt {
        out.push_str(START);
        out.push_str("assistant\n");
    }
    out
}

fn push_turn(out: &mut String, role: &str, content: &str) {
    out.push_str(START);
    out.push_str(role);
    out.push('\n');
    out.push_str(content);
    out.push_str(END);
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    const QWEN_LIKE: &str = "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{%- endif %}";

    #[test]
    fn smollm2_renders_like_its_template() {
        let template_system = default_system_prompt(SMOLLM2);
        let rendered = render_chatml(
            &[Message::user("What is the capital of France?")],
            true,
            template_system.as_deref(),
        );
        assert_eq!(
            rendered,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn explicit_system_replaces_the_default() {
        let messages = [Message::system("Be brief."), Message::user("Hi")];
        let rendered = render_chatml(&messages, false, Some("default"));
        assert_eq!(
            rendered,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn expression_built_system_blocks_are_skipped() {
        assert_eq!(default_system_prompt(QWEN_LIKE).as_deref(), Some("You are Qwen."));
        assert_eq!(default_system_prompt("{{'<|im_start|>' + role}}<|im_end|>"), None);
        assert!(is_chatml(SMOLLM2));
        assert!(!is_chatml("[INST] {{ prompt }} [/INST]"));
    }
}
