//! msgpack on the wire: requests are maps with a string `op` and named fields, responses are
//! `{"ok": value}` or `{"error": message}` (docs/abi.md).

use std::fmt;

use serde::de::{DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::abi;
use crate::error::{Error, Result};

/// A request under construction: a msgpack map whose first entry is `op`.
///
/// Field values are encoded with `rmp_serde::encode::write_named`, so nested structs (a
/// sampler) become maps with named fields, as the host expects.
#[derive(Clone)]
pub struct Request {
    body: Vec<u8>,
    fields: u32,
}

impl Request {
    pub fn new(op: &str) -> Request {
        Request { body: Vec::with_capacity(64), fields: 0 }.with("op", op)
    }

    /// Add a field. Encoding into a `Vec` cannot fail for the SDK's types.
    pub fn with<T: Serialize + ?Sized>(mut self, key: &str, value: &T) -> Request {
        rmp::encode::write_str(&mut self.body, key).expect("writing to a Vec cannot fail");
        rmp_serde::encode::write_named(&mut self.body, value)
            .unwrap_or_else(|err| panic!("cannot encode request field {:?}: {}", key, err));
        self.fields += 1;
        self
    }

    /// Add a field only when it has a value (absent fields take the host's default).
    pub fn with_opt<T: Serialize>(self, key: &str, value: Option<T>) -> Request {
        match value {
            Some(value) => self.with(key, &value),
            None => self,
        }
    }

    /// The complete msgpack map.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.body.len() + 5);
        rmp::encode::write_map_len(&mut bytes, self.fields).expect("writing to a Vec cannot fail");
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

#[derive(Deserialize)]
enum Response<T> {
    #[serde(rename = "ok")]
    Ok(T),
    #[serde(rename = "error")]
    Error(String),
}

/// Decode a response map into the `ok` value, or the host's error message.
pub fn decode_response<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    match rmp_serde::from_slice::<Response<T>>(bytes) {
        Ok(Response::Ok(value)) => Ok(value),
        Ok(Response::Error(message)) => Err(Error::Host(message)),
        Err(err) => Err(Error::Decode(err.to_string())),
    }
}

/// Send a request and block until its decoded response.
pub fn call<T: DeserializeOwned>(request: &Request) -> Result<T> {
    abi::call_with(&request.encode(), decode_response)
}

/// Bytes that travel as msgpack `bin` (a vocabulary mask, the vocabulary's token bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Bytes, D::Error> {
        deserializer.deserialize_byte_buf(BytesVisitor)
    }
}

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Bytes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bytes")
    }

    fn visit_bytes<E>(self, v: &[u8]) -> std::result::Result<Bytes, E> {
        Ok(Bytes(v.to_vec()))
    }

    fn visit_byte_buf<E>(self, v: Vec<u8>) -> std::result::Result<Bytes, E> {
        Ok(Bytes(v))
    }

    // A host that sends text for a token's bytes still decodes.
    fn visit_str<E>(self, v: &str) -> std::result::Result<Bytes, E> {
        Ok(Bytes(v.as_bytes().to_vec()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Bytes, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(byte) = seq.next_element::<u8>()? {
            bytes.push(byte);
        }
        Ok(Bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Nested {
        temperature: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        seed: Option<u64>,
    }

    #[test]
    fn request_is_a_map_with_op_first_and_named_nested_fields() {
        let request = Request::new("forward")
            .with("queue", &3u32)
            .with("sampler", &Nested { temperature: 0.5, seed: None })
            .with_opt::<u32>("top_k", None)
            .with("mask", &Bytes(vec![1, 2]));
        let bytes = request.encode();
        let mut expected = vec![0x84, 0xa2, b'o', b'p', 0xa7];
        expected.extend_from_slice(b"forward");
        expected.extend_from_slice(&[0xa5, b'q', b'u', b'e', b'u', b'e', 0x03]);
        expected.extend_from_slice(&[0xa7]);
        expected.extend_from_slice(b"sampler");
        expected.extend_from_slice(&[0x81, 0xab]);
        expected.extend_from_slice(b"temperature");
        expected.push(0xcb);
        expected.extend_from_slice(&0.5f64.to_be_bytes());
        expected.extend_from_slice(&[0xa4, b'm', b'a', b's', b'k', 0xc4, 0x02, 1, 2]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn responses_decode_to_values_or_host_errors() {
        // {"ok": [1, 2]}
        let ok = [0x81, 0xa2, b'o', b'k', 0x92, 0x01, 0x02];
        assert_eq!(decode_response::<Vec<u32>>(&ok), Ok(vec![1, 2]));
        // {"ok": nil} as unit
        let unit = [0x81, 0xa2, b'o', b'k', 0xc0];
        assert_eq!(decode_response::<()>(&unit), Ok(()));
        // {"error": "no"}
        let error = [0x81, 0xa5, b'e', b'r', b'r', b'o', b'r', 0xa2, b'n', b'o'];
        assert_eq!(decode_response::<()>(&error), Err(Error::Host("no".into())));
        assert!(matches!(decode_response::<u32>(&[0xc0]), Err(Error::Decode(_))));
    }

    #[test]
    fn bytes_accept_bin_and_text() {
        let bin = [0xc4, 0x02, 0xe2, 0x82];
        assert_eq!(rmp_serde::from_slice::<Bytes>(&bin).unwrap(), Bytes(vec![0xe2, 0x82]));
        let text = [0xa1, b'a'];
        assert_eq!(rmp_serde::from_slice::<Bytes>(&text).unwrap(), Bytes(vec![b'a']));
    }
}
