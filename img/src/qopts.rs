//! `-o` option strings as QEMU's `qemu_opts_do_parse` reads them for
//! `measure` and `amend`: every key checked against the driver's list and
//! every value against its type at parse time, with qemu-img's messages.

use super::size::strtosz;

/// The type of one option in a driver's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Any text.
    Str,
    /// `on` or `off`.
    Bool,
    /// A plain number.
    Number,
    /// A size with an optional suffix.
    Size,
}

/// Why an option string was refused (each variant prints as qemu-img does).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptError {
    /// A key the driver does not have.
    #[error("Invalid parameter '{0}'")]
    Unknown(String),
    /// A bool option with another value.
    #[error("Parameter '{0}' expects 'on' or 'off'")]
    NotBool(String),
    /// A number option with another value.
    #[error("Parameter '{0}' expects a number")]
    NotNumber(String),
    /// A size option with another value.
    #[error("Parameter '{0}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.")]
    NotSize(String),
}

/// Parsed `key=value` items, in order (a later key wins).
#[derive(Debug, Default)]
pub struct QOpts {
    items: Vec<(String, String)>,
}

impl QOpts {
    /// Splits `text` at single commas (`,,` is a comma in a value); a bare
    /// `key` means `key=on`; then checks keys and values against `list`.
    pub fn parse(text: &str, list: &[(&str, Kind)]) -> Result<Self, OptError> {
        let mut items = Vec::new();
        let mut cur = String::new();
        let mut chars = text.chars().peekable();
        let mut push = |cur: &mut String| {
            if !cur.is_empty() {
                let item = std::mem::take(cur);
                let (k, v) = match item.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (item, "on".to_string()),
                };
                items.push((k, v));
            }
        };
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    push(&mut cur);
                }
            } else {
                cur.push(c);
            }
        }
        push(&mut cur);
        for (k, v) in &items {
            let Some((_, kind)) = list.iter().find(|(name, _)| name == k) else {
                return Err(OptError::Unknown(k.clone()));
            };
            match kind {
                Kind::Str => {}
                Kind::Bool if v == "on" || v == "off" => {}
                Kind::Bool => return Err(OptError::NotBool(k.clone())),
                Kind::Number if parse_number(v).is_some() => {}
                Kind::Number => return Err(OptError::NotNumber(k.clone())),
                Kind::Size if strtosz(v).is_ok() => {}
                Kind::Size => return Err(OptError::NotSize(k.clone())),
            }
        }
        Ok(Self { items })
    }

    /// The last value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.items
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether `key` was given.
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// A bool option (validated by [`QOpts::parse`]).
    pub fn bool(&self, key: &str) -> Option<bool> {
        self.get(key).map(|v| v == "on")
    }

    /// A size option (validated by [`QOpts::parse`]).
    pub fn size(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| strtosz(v).ok())
    }

    /// A number option (validated by [`QOpts::parse`]).
    pub fn number(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(parse_number)
    }

    /// Keys given, in order, once each.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = Vec::new();
        for (k, _) in &self.items {
            if !keys.contains(&k.as_str()) {
                keys.push(k);
            }
        }
        keys
    }
}

/// `qemu_strtou64` as used by `QEMU_OPT_NUMBER`: decimal, `0x` hex or `0` octal.
fn parse_number(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if v.len() > 1 && v.starts_with('0') {
        u64::from_str_radix(&v[1..], 8).ok()
    } else {
        v.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &[(&str, Kind)] = &[
        ("a", Kind::Str),
        ("b", Kind::Bool),
        ("n", Kind::Number),
        ("s", Kind::Size),
    ];

    #[test]
    fn parse_and_check() {
        let o = QOpts::parse("a=x,,y,b,n=0x10,s=4k,a=z", LIST).unwrap();
        assert_eq!(o.get("a"), Some("z"));
        assert_eq!(o.bool("b"), Some(true));
        assert_eq!(o.number("n"), Some(16));
        assert_eq!(o.size("s"), Some(4096));
        assert_eq!(o.keys(), vec!["a", "b", "n", "s"]);
        assert_eq!(
            QOpts::parse("q=1", LIST).unwrap_err(),
            OptError::Unknown("q".into())
        );
        assert_eq!(
            QOpts::parse("b=maybe", LIST).unwrap_err(),
            OptError::NotBool("b".into())
        );
        assert_eq!(
            QOpts::parse("n=x", LIST).unwrap_err(),
            OptError::NotNumber("n".into())
        );
        assert_eq!(
            QOpts::parse("s=abc", LIST).unwrap_err(),
            OptError::NotSize("s".into())
        );
    }
}
