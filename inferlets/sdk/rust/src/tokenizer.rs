//! The model's tokenizer, on the host, plus a cached copy of the vocabulary's bytes for
//! decoding generated text incrementally inside the guest (no host call per token).

use std::cell::RefCell;
use std::rc::Rc;

use crate::error::{Error, Result};
use crate::wire::{call, Bytes, Request};

/// Token ids of `text` (no special tokens added; special-token text in `text` is recognised).
pub fn tokenize(text: &str) -> Result<Vec<u32>> {
    call(&Request::new("tokenize").with("text", text))
}

/// The text of `tokens`, as the host's tokenizer decodes it.
pub fn detokenize(tokens: &[u32]) -> Result<String> {
    call(&Request::new("detokenize").with("tokens", tokens))
}

/// The bytes of every token id.
pub struct Vocab {
    tokens: Vec<Vec<u8>>,
}

impl Vocab {
    pub fn from_token_bytes(tokens: Vec<Vec<u8>>) -> Vocab {
        Vocab { tokens }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn bytes(&self, token: u32) -> Result<&[u8]> {
        self.tokens
            .get(token as usize)
            .map(|bytes| bytes.as_slice())
            .ok_or_else(|| Error::usage(format!("token {} is outside the vocabulary", token)))
    }
}

thread_local! {
    static VOCAB: RefCell<Option<Rc<Vocab>>> = const { RefCell::new(None) };
}

/// The vocabulary, fetched from the host on first use (one large response) and then cached.
pub fn vocab() -> Result<Rc<Vocab>> {
    if let Some(vocab) = VOCAB.with(|cell| cell.borrow().clone()) {
        return Ok(vocab);
    }
    let tokens: Vec<Bytes> = call(&Request::new("vocab"))?;
    let vocab = Rc::new(Vocab::from_token_bytes(tokens.into_iter().map(|b| b.0).collect()));
    VOCAB.with(|cell| *cell.borrow_mut() = Some(vocab.clone()));
    Ok(vocab)
}
