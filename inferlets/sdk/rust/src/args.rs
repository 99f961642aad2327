//! A small command-line parser for inferlet arguments: `--name VALUE`, `--name=VALUE`, flags,
//! and positional words.

use std::str::FromStr;

use crate::error::{Error, Result};
use crate::runtime;

pub struct Args {
    items: Vec<String>,
}

impl Args {
    /// The instance's launch arguments.
    pub fn load() -> Result<Args> {
        Ok(Args::from_vec(runtime::args()?))
    }

    pub fn from_vec(items: Vec<String>) -> Args {
        Args { items }
    }

    /// Whether `--name` is present (removes it).
    pub fn flag(&mut self, name: &str) -> bool {
        let before = self.items.len();
        self.items.retain(|item| item != name);
        self.items.len() != before
    }

    /// The value of `--name VALUE` or `--name=VALUE` (the last one wins; removes them all).
    pub fn value<T: FromStr>(&mut self, name: &str) -> Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        match self.take_all(name)?.pop() {
            None => Ok(None),
            Some(text) => parse_value(text, name).map(Some),
        }
    }

    /// Every value of an option given several times (`--stop A --stop=B`), in order; removes
    /// them all.
    pub fn values<T: FromStr>(&mut self, name: &str) -> Result<Vec<T>>
    where
        T::Err: std::fmt::Display,
    {
        self.take_all(name)?.into_iter().map(|text| parse_value(text, name)).collect()
    }

    /// Removes every `--name VALUE` and `--name=VALUE`; returns their values in order.
    fn take_all(&mut self, name: &str) -> Result<Vec<String>> {
        let mut found = Vec::new();
        let prefix = format!("{}=", name);
        let mut i = 0;
        while i < self.items.len() {
            if self.items[i] == name {
                if i + 1 >= self.items.len() {
                    return Err(Error::usage(format!("{} needs a value", name)));
                }
                found.push(self.items.remove(i + 1));
                self.items.remove(i);
            } else if let Some(value) = self.items[i].strip_prefix(&prefix) {
                found.push(value.to_string());
                self.items.remove(i);
            } else {
                i += 1;
            }
        }
        Ok(found)
    }

    /// `value` with a default.
    pub fn value_or<T: FromStr>(&mut self, name: &str, default: T) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        Ok(self.value(name)?.unwrap_or(default))
    }

    /// The value of option `name`, or else the positional words joined by spaces (for a
    /// prompt given either way). Call it after every other option has been taken.
    pub fn option_or_words(mut self, name: &str) -> Result<String> {
        let option: Option<String> = self.value(name)?;
        let words = self.positional()?;
        match option {
            Some(_) if !words.is_empty() => Err(Error::usage(format!(
                "give {} either as an option or as words, not both (extra words: {:?})",
                name, words
            ))),
            Some(value) => Ok(value),
            None => Ok(words.join(" ")),
        }
    }

    /// The remaining positional words; anything still looking like an option is an error.
    pub fn positional(self) -> Result<Vec<String>> {
        if let Some(unknown) = self.items.iter().find(|item| item.starts_with("--")) {
            return Err(Error::usage(format!("unknown option {}", unknown)));
        }
        Ok(self.items)
    }
}

/// `text` as a `T`; a usage error naming the option when it does not parse.
fn parse_value<T: FromStr>(text: String, name: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    text.parse().map_err(|err| Error::usage(format!("bad value {:?} for {}: {}", text, name, err)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(items: &[&str]) -> Args {
        Args::from_vec(items.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn values_flags_and_positionals() {
        let mut a = args(&["--max-tokens", "8", "hello", "--chat", "--temperature=0.5", "world"]);
        assert_eq!(a.value::<usize>("--max-tokens").unwrap(), Some(8));
        assert_eq!(a.value::<f64>("--temperature").unwrap(), Some(0.5));
        assert_eq!(a.value::<u64>("--seed").unwrap(), None);
        assert!(a.flag("--chat"));
        assert!(!a.flag("--ignore-eos"));
        assert_eq!(a.positional().unwrap(), vec!["hello", "world"]);
    }

    #[test]
    fn errors_name_the_offending_option() {
        let mut a = args(&["--max-tokens", "many"]);
        let err = a.value::<usize>("--max-tokens").unwrap_err().to_string();
        assert!(err.contains("--max-tokens") && err.contains("many"), "{}", err);
        let mut a = args(&["--seed"]);
        assert!(a.value::<u64>("--seed").unwrap_err().to_string().contains("needs a value"));
        let err = args(&["--bogus"]).positional().unwrap_err().to_string();
        assert!(err.contains("--bogus"), "{}", err);
    }

    #[test]
    fn repeated_options_keep_every_value_in_order() {
        let mut a = args(&["--stop", "a", "hi", "--stop=b", "--stop", "--c"]);
        assert_eq!(a.values::<String>("--stop").unwrap(), vec!["a", "b", "--c"]);
        assert_eq!(a.positional().unwrap(), vec!["hi"]);
        let mut a = args(&["--seed", "1", "--seed", "2"]);
        assert_eq!(a.value::<u64>("--seed").unwrap(), Some(2));
        assert!(args(&["--stop"]).values::<String>("--stop").is_err());
    }

    #[test]
    fn prompt_as_option_or_words() {
        assert_eq!(args(&["--prompt", "a b"]).option_or_words("--prompt").unwrap(), "a b");
        assert_eq!(args(&["a", "b"]).option_or_words("--prompt").unwrap(), "a b");
        assert!(args(&["--prompt", "a", "b"]).option_or_words("--prompt").is_err());
    }
}
