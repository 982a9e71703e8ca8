//! SQLite behind [`Tx`]: tokio-rusqlite, one writer connection on its own
//! thread and one read-only connection (WAL: reads see every committed write
//! and never wait behind the writer's batches).

use std::path::Path;

use tokio_rusqlite::rusqlite::{
    self,
    types::{ToSqlOutput, ValueRef},
};

use super::sql::{Row, Tx, Value};
use super::{DbError, MIGRATIONS};

type Result<T> = std::result::Result<T, DbError>;

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(v) => ValueRef::Integer(*v),
            Value::Real(v) => ValueRef::Real(*v),
            Value::Text(v) => ValueRef::Text(v.as_bytes()),
            Value::Blob(v) => ValueRef::Blob(v),
        }))
    }
}

/// A connection (inside a transaction for writes).
struct SqliteTx<'c>(&'c rusqlite::Connection);

impl Tx for SqliteTx<'_> {
    fn execute(&mut self, sql: &'static str, params: &[Value]) -> Result<u64> {
        let mut st = self.0.prepare_cached(sql)?;
        Ok(st.execute(rusqlite::params_from_iter(params))? as u64)
    }

    fn query(&mut self, sql: &'static str, params: &[Value]) -> Result<Vec<Row>> {
        let mut st = self.0.prepare_cached(sql)?;
        let columns = st.column_count();
        let mut rows = st.query(rusqlite::params_from_iter(params))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut values = Vec::with_capacity(columns);
            for idx in 0..columns {
                values.push(match r.get_ref(idx)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(v) => Value::Int(v),
                    ValueRef::Real(v) => Value::Real(v),
                    ValueRef::Text(t) => Value::Text(
                        String::from_utf8(t.to_vec())
                            .map_err(|_| DbError::Corrupt(format!("column {idx}: not UTF-8")))?,
                    ),
                    ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                });
            }
            out.push(Row(values));
        }
        Ok(out)
    }
}

/// The SQLite store's two connections.
#[derive(Debug, Clone)]
pub struct Sqlite {
    /// The one writer.
    conn: tokio_rusqlite::Connection,
    /// Reads.
    read: tokio_rusqlite::Connection,
}

fn closed<E>(_: tokio_rusqlite::Error<E>) -> DbError {
    DbError::Closed
}

impl Sqlite {
    /// Opens (creating) the database at `path` and applies pending migrations.
    pub async fn open(path: &Path) -> Result<Sqlite> {
        let conn = tokio_rusqlite::Connection::open(path).await?;
        conn.call_raw(|c| -> Result<()> {
            c.pragma_update(None, "journal_mode", "wal")?;
            c.pragma_update(None, "synchronous", "normal")?;
            c.pragma_update(None, "foreign_keys", "on")?;
            c.busy_timeout(std::time::Duration::from_secs(5))?;
            let version: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
            for (n, sql) in MIGRATIONS
                .iter()
                .enumerate()
                .skip(usize::try_from(version).unwrap_or(0))
            {
                let tx = c.transaction()?;
                tx.execute_batch(sql)?;
                tx.pragma_update(None, "user_version", n as i64 + 1)?;
                tx.commit()?;
            }
            Ok(())
        })
        .await
        .map_err(closed)??;
        let read = tokio_rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .await?;
        read.call_raw(|c| c.busy_timeout(std::time::Duration::from_secs(5)))
            .await
            .map_err(closed)??;
        Ok(Sqlite { conn, read })
    }

    /// The schema version (number of migrations applied).
    pub async fn schema_version(&self) -> Result<i64> {
        Ok(self
            .read
            .call_raw(|c| c.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0)))
            .await
            .map_err(closed)??)
    }

    /// Runs `f` in one transaction of the writer: committed when it returns
    /// `Ok`, rolled back otherwise.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
    {
        self.conn
            .call_raw(move |c| -> Result<T> {
                let tx = c.transaction()?;
                let out = f(&mut SqliteTx(&tx))?;
                tx.commit()?;
                Ok(out)
            })
            .await
            .map_err(closed)?
    }

    /// Runs `f` on the read connection.
    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
    {
        self.read
            .call_raw(move |c| f(&mut SqliteTx(c)))
            .await
            .map_err(closed)?
    }
}
