//! Durations in configuration files and flags: integer seconds (`3600`) or a number with
//! a unit (`30s`, `15m`, `1h`, `7d`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A duration as operators write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ttl(pub Duration);

impl Ttl {
    pub const fn secs(s: u64) -> Self {
        Ttl(Duration::from_secs(s))
    }
    pub fn as_secs(self) -> u64 {
        self.0.as_secs()
    }
}

impl FromStr for Ttl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("\"{s}\" is not a duration; write seconds or a number with s, m, h or d")
        })?;
        let mult = match unit {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => {
                return Err(format!(
                    "\"{s}\" has unknown unit \"{unit}\"; use s, m, h or d"
                ));
            }
        };
        n.checked_mul(mult)
            .map(Ttl::secs)
            .ok_or_else(|| format!("\"{s}\" is too long a duration"))
    }
}

impl fmt::Display for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}s", self.0.as_secs())
    }
}

impl<'de> serde::Deserialize<'de> for Ttl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Ttl::secs(s)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_rejects_garbage() {
        assert_eq!("90".parse::<Ttl>(), Ok(Ttl::secs(90)));
        assert_eq!("90s".parse::<Ttl>(), Ok(Ttl::secs(90)));
        assert_eq!("15m".parse::<Ttl>(), Ok(Ttl::secs(900)));
        assert_eq!("1h".parse::<Ttl>(), Ok(Ttl::secs(3600)));
        assert_eq!("7d".parse::<Ttl>(), Ok(Ttl::secs(604800)));
        assert!("".parse::<Ttl>().is_err());
        assert!("h".parse::<Ttl>().is_err());
        assert!("1w".parse::<Ttl>().is_err());
        assert!("-5".parse::<Ttl>().is_err());
        assert!("99999999999999999999d".parse::<Ttl>().is_err());
    }
}
