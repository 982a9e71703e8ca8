//! The blocking client of the controller's HTTP API that the operator's
//! commands, `flash` and the demo use.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde_json::Value;

/// Where the API is and who calls it.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Controller URL.
    #[arg(long, env = "EDGEFLEET_URL", default_value = "http://127.0.0.1:8080")]
    pub controller: String,
    /// API token.
    #[arg(long, env = "EDGEFLEET_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The controller did not answer (not running, wrong URL, timeout).
    #[error("controller at {url}: {source}")]
    Unreachable {
        /// The controller URL.
        url: String,
        /// What failed.
        source: Box<ureq::Error>,
    },
    /// The controller answered with an error.
    #[error("{status} {code}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The API's error code (`not_found`, `conflict`, ...).
        code: String,
        /// Its message.
        message: String,
    },
    /// A text document could not be read.
    #[error("{path}: {reason}")]
    Text {
        /// The API path.
        path: String,
        /// The status or the read error.
        reason: String,
    },
    /// The file to upload cannot be opened.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A blocking API client.
#[derive(Debug)]
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// A client for `api`.
    pub fn new(api: &ApiArgs) -> Client {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .into();
        Client {
            base: api.controller.trim_end_matches('/').to_owned(),
            token: api.token.clone(),
            agent,
        }
    }

    fn unreachable(&self, e: ureq::Error) -> ClientError {
        ClientError::Unreachable {
            url: self.base.clone(),
            source: Box::new(e),
        }
    }

    fn answer(
        &self,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value, ClientError> {
        let mut r = r.map_err(|e| self.unreachable(e))?;
        let status = r.status();
        let body: Value = r
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_json()
            .unwrap_or(Value::Null);
        if status.is_success() {
            Ok(body)
        } else {
            let text = |k: &str, or: &str| body["error"][k].as_str().unwrap_or(or).to_owned();
            Err(ClientError::Refused {
                status: status.as_u16(),
                code: text("code", "error"),
                message: text("message", "no details"),
            })
        }
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token.as_deref().unwrap_or(""))
    }

    /// GET a JSON document.
    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        let r = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", self.auth())
            .call();
        self.answer(r)
    }

    /// GET a JSON document that may not exist (None on 404).
    pub fn get_optional(&self, path: &str) -> Result<Option<Value>, ClientError> {
        let r = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", self.auth())
            .call();
        if matches!(&r, Ok(r) if r.status() == 404) {
            return Ok(None);
        }
        self.answer(r).map(Some)
    }

    /// GET a text document (`/metrics`).
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let mut r = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", self.auth())
            .call()
            .map_err(|e| self.unreachable(e))?;
        let text = |reason: String| ClientError::Text {
            path: path.to_owned(),
            reason,
        };
        if !r.status().is_success() {
            return Err(text(r.status().to_string()));
        }
        r.body_mut()
            .with_config()
            .limit(16 << 20)
            .read_to_string()
            .map_err(|e| text(e.to_string()))
    }

    /// POST JSON.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", self.auth())
            .send_json(body);
        self.answer(r)
    }

    /// POST a file.
    pub fn upload(&self, path: &str, file: &Path) -> Result<Value, ClientError> {
        let f = std::fs::File::open(file).map_err(|source| ClientError::File {
            path: file.to_owned(),
            source,
        })?;
        let r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", self.auth())
            .header("Content-Type", "application/octet-stream")
            .send(&f);
        self.answer(r)
    }
}
