//! The one parser for the agent's Prometheus text (/metrics). Series are selected by name and a
//! *subset* of their labels, and the values of all matching series are summed, so that a label
//! the agent adds later (say `rule_kind`) does not break a test that does not care about it. No
//! matching series is an error, never a silent zero.

use anyhow::{Context, Result, bail};

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    pub fn parse(text: &str) -> Result<Self> {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_line(l).with_context(|| format!("bad metrics line {l:?}")))
            .collect::<Result<_>>()?;
        Ok(Self { samples })
    }

    /// The series named `name` whose labels include every one of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
    }

    /// The sum over the matching series; an error if there are none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let mut matched = self.matching(name, labels).peekable();
        if matched.peek().is_none() {
            let known: Vec<String> = self
                .samples
                .iter()
                .filter(|s| s.name == name)
                .map(|s| format!("{:?}", s.labels))
                .collect();
            bail!("no series {name} with labels {labels:?} (series of that name: {known:?})");
        }
        Ok(matched.map(|s| s.value).sum())
    }

    /// [`Self::sum`] of a counter or gauge that holds whole numbers.
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> Result<u64> {
        let sum = self.sum(name, labels)?;
        if sum < 0.0 || sum.fract() != 0.0 {
            bail!("{name} {labels:?} = {sum}: not a count");
        }
        Ok(sum as u64)
    }
}

fn parse_line(line: &str) -> Result<Sample> {
    let (series, value) = match line.find('{') {
        Some(open) => {
            let close = closing_brace(line, open).context("unterminated labels")?;
            (&line[..=close], line[close + 1..].trim())
        }
        None => line.split_once(' ').context("no value")?,
    };
    // A timestamp may follow the value.
    let value = value.split_whitespace().next().context("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().with_context(|| format!("value {v:?}"))?,
    };
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, parse_labels(&rest[..rest.len() - 1])?),
        None => (series, Vec::new()),
    };
    Ok(Sample {
        name: name.trim().to_owned(),
        labels,
        value,
    })
}

/// The index of the `}` closing the label set opened at `open`, skipping quoted values.
fn closing_brace(line: &str, open: usize) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line[open..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(open + i),
            _ => {}
        }
    }
    None
}

fn parse_labels(text: &str) -> Result<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=').context("label without =")?;
        let after = after.strip_prefix('"').context("label value not quoted")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().context("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().context("dangling escape")?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_owned(), value));
        rest = after[end + 1..].trim_start().trim_start_matches(',').trim_start();
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP egress_connections_total Connections.
# TYPE egress_connections_total counter
egress_connections_total{route="proxy-connect",outcome="ok",rule_kind="whitelist_no_proxy"} 3
egress_connections_total{route="proxy-connect",outcome="ok",rule_kind="default_route"} 2
egress_connections_total{route="proxy-connect",outcome="error",rule_kind="proxy"} 1
egress_relay_bytes_total{method="splice"} 1048576
egress_relay_bytes_total{method="copy"} 12
egress_connections_active 0
egress_upstream_connect_seconds_sum 0.25
egress_odd{rule="a \"quoted\", {braced} value"} 7
# EOF
"#;

    #[test]
    fn sums_the_series_that_have_the_given_labels() {
        let m = Metrics::parse(TEXT).unwrap();
        let ok = [("route", "proxy-connect"), ("outcome", "ok")];
        assert_eq!(m.count("egress_connections_total", &ok).unwrap(), 5);
        assert_eq!(
            m.count("egress_connections_total", &[("route", "proxy-connect")])
                .unwrap(),
            6
        );
        assert_eq!(m.count("egress_connections_total", &[]).unwrap(), 6);
        assert_eq!(
            m.count("egress_relay_bytes_total", &[("method", "splice")])
                .unwrap(),
            1 << 20
        );
        assert_eq!(m.count("egress_connections_active", &[]).unwrap(), 0);
        assert_eq!(m.sum("egress_upstream_connect_seconds_sum", &[]).unwrap(), 0.25);
        assert_eq!(
            m.count("egress_odd", &[("rule", "a \"quoted\", {braced} value")])
                .unwrap(),
            7
        );
    }

    #[test]
    fn a_missing_series_is_an_error_not_zero() {
        let m = Metrics::parse(TEXT).unwrap();
        assert!(m.count("egress_no_such_total", &[]).is_err());
        let err = m
            .count("egress_connections_total", &[("outcome", "denied")])
            .unwrap_err();
        assert!(err.to_string().contains("rule_kind"), "{err}");
        assert!(
            m.count("egress_upstream_connect_seconds_sum", &[]).is_err(),
            "0.25 is no count"
        );
    }

    #[test]
    fn malformed_text_is_an_error() {
        assert!(Metrics::parse("egress_x{route=\"a} 1").is_err());
        assert!(Metrics::parse("egress_x notanumber").is_err());
    }
}
