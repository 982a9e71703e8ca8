//! Device tags: `key=value` pairs that rollouts and listings select on.

use std::collections::BTreeMap;

/// A device's tags, by key.
pub type Tags = BTreeMap<String, String>;

/// A tag list that is not `key=value,key2=value2`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tag {0:?}: expected key=value")]
pub struct TagError(pub String);

/// Tags from `k=v,k2=v2` (spaces around keys and values are dropped; empty
/// items are skipped).
pub fn parse(text: &str) -> Result<Tags, TagError> {
    let mut out = Tags::new();
    for pair in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| TagError(pair.to_owned()))?;
        out.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_parse_from_pairs_and_name_the_bad_one() {
        let t = parse(" site = a ,, hw=pi4").expect("parses");
        assert_eq!(t.get("site").map(String::as_str), Some("a"));
        assert_eq!(t.get("hw").map(String::as_str), Some("pi4"));
        assert_eq!(parse("").expect("empty"), Tags::new());
        let e = parse("a=1,oops").expect_err("no =").to_string();
        assert!(e.contains("\"oops\"") && e.contains("key=value"), "{e}");
    }
}
