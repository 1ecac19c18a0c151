//! Resource capacities written as in the OpenSIPS `load_balancer` table: `pstn=100;tts=20`.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// Named resources with their capacities, in the order they were written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resources(Vec<(String, u32)>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourcesError {
    #[error("empty resource list; expected e.g. \"pstn=100\"")]
    Empty,
    #[error("{0:?} is not name=capacity")]
    NotAPair(String),
    #[error("resource name {0:?} must be letters, digits, '-' or '_'")]
    BadName(String),
    #[error("capacity {value:?} of {name:?} is not a whole number from 0 to 4294967295")]
    BadCapacity { name: String, value: String },
    #[error("resource {0:?} is given twice")]
    Duplicate(String),
}

impl Resources {
    pub fn new(items: Vec<(String, u32)>) -> Self {
        Resources(items)
    }
    pub fn get(&self, name: &str) -> Option<u32> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, c)| *c)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, u32)> {
        self.0.iter().map(|(n, c)| (n.as_str(), *c))
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl FromStr for Resources {
    type Err = ResourcesError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out: Vec<(String, u32)> = Vec::new();
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| ResourcesError::NotAPair(part.to_string()))?;
            let (name, value) = (name.trim(), value.trim());
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ResourcesError::BadName(name.to_string()));
            }
            let cap: u32 = value.parse().map_err(|_| ResourcesError::BadCapacity {
                name: name.to_string(),
                value: value.to_string(),
            })?;
            if out.iter().any(|(n, _)| n == name) {
                return Err(ResourcesError::Duplicate(name.to_string()));
            }
            out.push((name.to_string(), cap));
        }
        if out.is_empty() {
            return Err(ResourcesError::Empty);
        }
        Ok(Resources(out))
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (n, c)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            write!(f, "{n}={c}")?;
        }
        Ok(())
    }
}

impl Serialize for Resources {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Resources {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_reference_table() {
        let r: Resources = "pstn=100".parse().unwrap();
        assert_eq!(r.get("pstn"), Some(100));
        let r: Resources = "pstn=100; tts=20".parse().unwrap();
        assert_eq!(r.get("tts"), Some(20));
        assert_eq!(r.to_string(), "pstn=100;tts=20");
    }

    #[test]
    fn rejects_bad_input_naming_the_value() {
        assert_eq!("".parse::<Resources>(), Err(ResourcesError::Empty));
        assert_eq!(
            "pstn".parse::<Resources>(),
            Err(ResourcesError::NotAPair("pstn".into()))
        );
        let e = "pstn=lots".parse::<Resources>().unwrap_err();
        assert!(e.to_string().contains("\"lots\""), "{e}");
        assert!("pstn=-1".parse::<Resources>().is_err());
        assert!("pstn=1;pstn=2".parse::<Resources>().is_err());
        assert!("p s=1".parse::<Resources>().is_err());
    }
}
