//! The SQL both backends speak. A statement is written once, with SQLite's
//! numbered parameters (`?1`, `?2`; PostgreSQL gets `$1`, `$2`), in the subset
//! of SQL both engines run the same way (`INSERT .. ON CONFLICT DO NOTHING`,
//! `RETURNING`, `CASE` rather than two-argument `MAX`). Values and rows have
//! five kinds; each backend implements [`Tx`], and the store's queries are
//! written against it, so both backends run the same code.

use edgefleet_shared::ids::InvalidId;

use super::DbError;

type Result<T> = std::result::Result<T, DbError>;

/// A parameter or a column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An integer (booleans are 0 and 1).
    Int(i64),
    /// A floating-point number.
    Real(f64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "NULL",
            Value::Int(_) => "an integer",
            Value::Real(_) => "a number",
            Value::Text(_) => "text",
            Value::Blob(_) => "bytes",
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::Int(i64::from(v))
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(i64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Real(v)
    }
}

impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_owned())
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}

impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Value {
        Value::Blob(v)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// Parameters of a statement: `vals![a, b, c]`.
macro_rules! vals {
    ($($v:expr),* $(,)?) => {
        &[$($crate::server::db::sql::Value::from($v)),*]
    };
}
pub(crate) use vals;

/// A column's value as a Rust type.
pub trait FromValue: Sized {
    /// What the type needs, for errors.
    const WANT: &'static str;
    /// The value, if it is of this type.
    fn from_value(v: &Value) -> Option<Self>;
}

impl FromValue for i64 {
    const WANT: &'static str = "an integer";
    fn from_value(v: &Value) -> Option<i64> {
        match v {
            Value::Int(n) => Some(*n),
            _ => None,
        }
    }
}

impl FromValue for u64 {
    const WANT: &'static str = "an integer of 0 or more";
    fn from_value(v: &Value) -> Option<u64> {
        i64::from_value(v).and_then(|n| u64::try_from(n).ok())
    }
}

impl FromValue for u32 {
    const WANT: &'static str = "an integer of 32 bits";
    fn from_value(v: &Value) -> Option<u32> {
        i64::from_value(v).and_then(|n| u32::try_from(n).ok())
    }
}

impl FromValue for bool {
    const WANT: &'static str = "a boolean (0 or 1)";
    fn from_value(v: &Value) -> Option<bool> {
        match v {
            Value::Int(0) => Some(false),
            Value::Int(1) => Some(true),
            _ => None,
        }
    }
}

impl FromValue for f64 {
    const WANT: &'static str = "a number";
    fn from_value(v: &Value) -> Option<f64> {
        match v {
            Value::Real(x) => Some(*x),
            // SQLite keeps a REAL that is whole as it was given.
            #[allow(clippy::cast_precision_loss)]
            Value::Int(n) => Some(*n as f64),
            _ => None,
        }
    }
}

impl FromValue for String {
    const WANT: &'static str = "text";
    fn from_value(v: &Value) -> Option<String> {
        match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    const WANT: &'static str = "bytes";
    fn from_value(v: &Value) -> Option<Vec<u8>> {
        match v {
            Value::Blob(b) => Some(b.clone()),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    const WANT: &'static str = T::WANT;
    fn from_value(v: &Value) -> Option<Option<T>> {
        match v {
            Value::Null => Some(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// A result row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub(super) Vec<Value>);

impl Row {
    fn value(&self, idx: usize) -> Result<&Value> {
        self.0
            .get(idx)
            .ok_or_else(|| DbError::Corrupt(format!("column {idx} is missing")))
    }

    /// Column `idx` as a `T`.
    pub fn get<T: FromValue>(&self, idx: usize) -> Result<T> {
        let v = self.value(idx)?;
        T::from_value(v).ok_or_else(|| {
            DbError::Corrupt(format!(
                "column {idx}: {} expected, found {}",
                T::WANT,
                v.kind()
            ))
        })
    }

    /// Column `idx` parsed as a checked id (`DeviceId`, `Digest`): every value
    /// was checked before it was stored, so one that fails the check now is
    /// reported, not trusted.
    pub fn id<T: std::str::FromStr<Err = InvalidId>>(&self, idx: usize) -> Result<T> {
        let text: String = self.get(idx)?;
        text.parse()
            .map_err(|e: InvalidId| DbError::Corrupt(format!("column {idx}: {e}")))
    }

    /// Column `idx` as a checked id, or `None` where it is NULL.
    pub fn id_or_none<T: std::str::FromStr<Err = InvalidId>>(
        &self,
        idx: usize,
    ) -> Result<Option<T>> {
        match self.value(idx)? {
            Value::Null => Ok(None),
            _ => self.id(idx).map(Some),
        }
    }

    /// Column `idx` as JSON text parsed, `None` where it is NULL or not JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self, idx: usize) -> Result<Option<T>> {
        let text: Option<String> = self.get(idx)?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }
}

/// A transaction (or, for reads, a connection) of either backend.
pub trait Tx {
    /// Runs a statement; returns the rows it changed.
    fn execute(&mut self, sql: &'static str, params: &[Value]) -> Result<u64>;
    /// Runs a query; returns every row.
    fn query(&mut self, sql: &'static str, params: &[Value]) -> Result<Vec<Row>>;

    /// The first row of a query, if any.
    fn query_opt(&mut self, sql: &'static str, params: &[Value]) -> Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The one row a query always answers (a `COUNT`, an `INSERT .. RETURNING`).
    fn query_one(&mut self, sql: &'static str, params: &[Value]) -> Result<Row> {
        self.query_opt(sql, params)?
            .ok_or_else(|| DbError::Corrupt("a query that always answers a row gave none".into()))
    }
}

/// A statement with SQLite's numbered parameters (`?1`) rewritten for
/// PostgreSQL (`$1`). Statements here hold no string literal with a `?`.
pub fn numbered_dollars(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_parameters_become_dollars() {
        assert_eq!(
            numbered_dollars("SELECT a FROM t WHERE b = ?1 AND c BETWEEN ?2 AND ?12"),
            "SELECT a FROM t WHERE b = $1 AND c BETWEEN $2 AND $12"
        );
        assert_eq!(numbered_dollars("SELECT '?' , ?"), "SELECT '?' , ?");
    }

    #[test]
    fn columns_convert_or_name_what_was_wrong() {
        let row = Row(vec![
            Value::Int(7),
            Value::Null,
            Value::Text("x".into()),
            Value::Int(-1),
        ]);
        assert_eq!(row.get::<u64>(0).expect("int"), 7);
        assert_eq!(row.get::<Option<u64>>(1).expect("null"), None);
        assert_eq!(row.get::<String>(2).expect("text"), "x");
        let e = row.get::<u64>(3).expect_err("negative").to_string();
        assert!(e.contains("column 3") && e.contains("0 or more"), "{e}");
        let e = row.get::<i64>(2).expect_err("text").to_string();
        assert!(e.contains("an integer expected, found text"), "{e}");
        assert!(row.get::<i64>(9).is_err());
        assert!(row.id::<edgefleet_shared::DeviceId>(2).is_ok());
        assert!(row.id::<edgefleet_shared::Digest>(2).is_err());
    }
}
