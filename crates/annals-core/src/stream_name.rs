//! Validated stream names.

use std::{fmt, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Error, Result};

/// Maximum length of a stream name, in bytes of UTF-8.
pub const MAX_STREAM_NAME_LEN: usize = 256;

/// The name of a stream, e.g. `account-42`.
///
/// Valid names are 1–256 bytes of UTF-8 without control characters. Names
/// starting with `$` belong to the system: [`StreamName::new`] rejects them,
/// [`StreamName::system`] builds them. Cloning is cheap (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName(Arc<str>);

impl StreamName {
    /// A user stream name. Fails with [`Error::InvalidInput`] for empty,
    /// over-long, control-character or `$`-prefixed names.
    pub fn new(name: impl AsRef<str>) -> Result<Self> {
        let name = name.as_ref();
        validate_common(name)?;
        if name.starts_with('$') {
            return Err(Error::invalid(format!(
                "stream name '{name}' starts with '$', which is reserved for system streams"
            )));
        }
        Ok(StreamName(Arc::from(name)))
    }

    /// A system stream name (must start with `$`). Only the store and its own
    /// subsystems (dead-letter queues, projections) should create these.
    pub fn system(name: impl AsRef<str>) -> Result<Self> {
        let name = name.as_ref();
        validate_common(name)?;
        if !name.starts_with('$') {
            return Err(Error::invalid(format!("system stream name '{name}' must start with '$'")));
        }
        Ok(StreamName(Arc::from(name)))
    }

    /// Accepts both user and system names; for decoding names the store
    /// itself wrote.
    pub fn any(name: impl AsRef<str>) -> Result<Self> {
        let name = name.as_ref();
        validate_common(name)?;
        Ok(StreamName(Arc::from(name)))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is a system (`$`-prefixed) stream.
    pub fn is_system(&self) -> bool {
        self.0.starts_with('$')
    }

    /// The category: the part before the first `-`, or the whole name when
    /// there is no `-`. For `account-42` it is `account`.
    pub fn category(&self) -> &str {
        category_of(&self.0)
    }

    /// The id part: everything after the first `-`, if any.
    pub fn id(&self) -> Option<&str> {
        self.0.split_once('-').map(|(_, id)| id)
    }
}

/// The category of a stream name given as a plain string (see
/// [`StreamName::category`]).
pub fn category_of(name: &str) -> &str {
    name.split_once('-').map_or(name, |(cat, _)| cat)
}

fn validate_common(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid("stream name must not be empty"));
    }
    if name.len() > MAX_STREAM_NAME_LEN {
        return Err(Error::invalid(format!(
            "stream name is {} bytes, the maximum is {MAX_STREAM_NAME_LEN}",
            name.len()
        )));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(Error::invalid(format!("stream name contains control character U+{:04X}", c as u32)));
    }
    Ok(())
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamName({:?})", &*self.0)
    }
}

impl AsRef<str> for StreamName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for StreamName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        StreamName::new(s)
    }
}

impl TryFrom<&str> for StreamName {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        StreamName::new(s)
    }
}

impl TryFrom<String> for StreamName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        StreamName::new(s)
    }
}

impl Serialize for StreamName {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for StreamName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        StreamName::any(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names_and_categories() {
        let s = StreamName::new("account-42").unwrap();
        assert_eq!(s.category(), "account");
        assert_eq!(s.id(), Some("42"));
        let s = StreamName::new("order-a-b").unwrap();
        assert_eq!(s.category(), "order");
        assert_eq!(s.id(), Some("a-b"));
        let s = StreamName::new("plain").unwrap();
        assert_eq!(s.category(), "plain");
        assert_eq!(s.id(), None);
        assert!(StreamName::new("コーヒー-☕").is_ok());
        assert!(StreamName::new("x".repeat(256)).is_ok());
    }

    #[test]
    fn invalid_names_are_rejected() {
        for bad in ["", "a\nb", "tab\there", "\u{7f}del"] {
            assert!(matches!(StreamName::new(bad), Err(Error::InvalidInput { .. })), "{bad:?}");
        }
        assert!(matches!(StreamName::new("x".repeat(257)), Err(Error::InvalidInput { .. })));
        assert!(matches!(StreamName::new("$system"), Err(Error::InvalidInput { .. })));
        assert!(StreamName::system("$system").unwrap().is_system());
        assert!(StreamName::system("user").is_err());
    }
}
