//! The doctor's findings: an ordered list of steps, each with a status, a sentence for humans
//! and structured data for `--json`.

use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// A fact worth knowing that is not a problem (no SRV record, no delegation).
    Info,
    /// A problem that discovery works around (a broken .well-known falls back to SRV).
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Info => "info",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Step {
    pub step: &'static str,
    pub status: Status,
    pub message: String,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub data: Map<String, Value>,
}

/// Where federation traffic for the server name ended up, when the version endpoint answered.
#[derive(Debug, Serialize)]
pub struct Federation {
    pub ip: String,
    pub port: u16,
    /// The name the certificate was checked against (and sent as SNI).
    pub tls_name: String,
    pub host_header: String,
    pub server: Value,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub server_name: String,
    pub ok: bool,
    pub steps: Vec<Step>,
    pub federation: Option<Federation>,
}

impl Report {
    pub fn new(server_name: &str) -> Self {
        Self {
            server_name: server_name.to_owned(),
            ok: false,
            steps: Vec::new(),
            federation: None,
        }
    }

    pub fn add(&mut self, step: &'static str, status: Status, message: impl Into<String>, data: Value) {
        let data = match data {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            other => Map::from_iter([("value".to_owned(), other)]),
        };
        self.steps.push(Step {
            step,
            status,
            message: message.into(),
            data,
        });
    }

    pub fn ok(&mut self, step: &'static str, message: impl Into<String>, data: Value) {
        self.add(step, Status::Ok, message, data)
    }

    pub fn info(&mut self, step: &'static str, message: impl Into<String>, data: Value) {
        self.add(step, Status::Info, message, data)
    }

    pub fn render_text(&self) -> String {
        let mut out = format!("egress doctor: federation with {}\n", self.server_name);
        for step in &self.steps {
            out.push_str(&format!(
                "  {:<5} {:<11} {}\n",
                step.status.label(),
                step.step,
                step.message
            ));
        }
        match &self.federation {
            Some(f) => out.push_str(&format!(
                "result: ok: federation requests for {} go to {} port {} (certificate for {}, Host: {})\n",
                self.server_name, f.ip, f.port, f.tls_name, f.host_header
            )),
            None => out.push_str(&format!(
                "result: FAILED: no federation endpoint of {} answered through egress; see the FAIL steps\n",
                self.server_name
            )),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_and_json_carry_the_same_steps() {
        let mut report = Report::new("example.org");
        report.ok(
            "srv",
            "_matrix-fed._tcp.example.org -> a.example.org:8448",
            json!({"port": 8448}),
        );
        report.add("tls", Status::Fail, "certificate rejected", Value::Null);
        let text = report.render_text();
        assert!(
            text.contains("ok    srv         _matrix-fed._tcp.example.org -> a.example.org:8448"),
            "{text}"
        );
        assert!(text.contains("FAIL  tls         certificate rejected"), "{text}");
        assert!(text.contains("result: FAILED"), "{text}");

        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["steps"][0]["status"], "ok");
        assert_eq!(json["steps"][0]["data"]["port"], 8448);
        assert_eq!(json["steps"][1]["status"], "fail");
        assert!(json["steps"][1].get("data").is_none());
    }
}
