use std::rc::Rc;

use serde::Deserialize;

use crate::chat::{self, Message};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::queue::Queue;
use crate::tokenizer::{self, Vocab};
use crate::wire::{call, Request};

/// A special token as the host names it: by id or by its text.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TokenRef {
    Id(u32),
    Text(String),
}

/// The `model_info` op's answer. Fields the SDK does not know are ignored.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub page_size: u32,
    pub vocab_size: u32,
    #[serde(default)]
    pub stop_tokens: Vec<u32>,
    #[serde(default)]
    pub chat_template: Option<String>,
    #[serde(default)]
    pub bos_token: Option<TokenRef>,
    #[serde(default)]
    pub eos_token: Option<TokenRef>,
    #[serde(default)]
    pub max_position: Option<u64>,
}

/// The served model: its facts, its tokenizer and the factory for contexts.
#[derive(Clone, Debug)]
pub struct Model {
    info: Rc<ModelInfo>,
}

impl Model {
    /// Ask the host for the model's facts.
    pub fn load() -> Result<Model> {
        let info: ModelInfo = call(&Request::new("model_info"))?;
        if info.page_size == 0 {
            return Err(Error::Decode("model_info reported page_size 0".into()));
        }
        Ok(Model { info: Rc::new(info) })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Tokens per KV page.
    pub fn page_size(&self) -> u32 {
        self.info.page_size
    }

    /// Tokens that end a turn (end of sequence, end of message).
    pub fn stop_tokens(&self) -> &[u32] {
        &self.info.stop_tokens
    }

    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        tokenizer::tokenize(text)
    }

    pub fn detokenize(&self, tokens: &[u32]) -> Result<String> {
        tokenizer::detokenize(tokens)
    }

    pub fn vocab(&self) -> Result<Rc<Vocab>> {
        tokenizer::vocab()
    }

    /// Render a conversation with the model's chat template, ending with the assistant's turn
    /// opened. Only ChatML templates are supported (see [`chat`]).
    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        let template = self.info.chat_template.as_deref().unwrap_or("");
        if !chat::is_chatml(template) {
            return Err(Error::usage(format!(
                "the chat template of {} is not ChatML; render the prompt yourself",
                self.info.name
            )));
        }
        let system = chat::default_system_prompt(template);
        Ok(chat::render_chatml(messages, true, system.as_deref()))
    }

    /// An empty context on the default queue.
    pub fn new_context(&self) -> Context {
        Context::new(self, Queue::DEFAULT)
    }

    /// An empty context whose requests go on `queue`.
    pub fn new_context_on(&self, queue: Queue) -> Context {
        Context::new(self, queue)
    }
}
