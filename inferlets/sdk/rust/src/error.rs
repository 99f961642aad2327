use std::fmt;

/// What can go wrong in an SDK call. Misuse of the ABI itself never gets here: the host ends
/// the instance instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The host answered `{"error": message}`; the instance and everyone else carry on.
    Host(String),
    /// The host's response did not have the shape this SDK expects.
    Decode(String),
    /// The program asked for something that cannot work (bad arguments, wrong state).
    Usage(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn usage(message: impl Into<String>) -> Error {
        Error::Usage(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Host(message) => write!(f, "{}", message),
            Error::Decode(message) => write!(f, "malformed response from the host: {}", message),
            Error::Usage(message) => write!(f, "{}", message),
        }
    }
}

impl std::error::Error for Error {}
