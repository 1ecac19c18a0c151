//! A reader for the Prometheus text exposition (`GET /metrics` of both programs).

use std::collections::BTreeMap;

/// One sample line of a Prometheus text exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl MetricSample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

fn bad_metrics_line(line: &str) -> ! {
    panic!("unreadable metrics line {line:?}")
}

/// The sample lines of a Prometheus text exposition (comments skipped). Label values are read
/// with their escapes (`\\`, `\"`, `\n`) undone; a line that cannot be read panics.
pub fn parse_metrics(text: &str) -> Vec<MetricSample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .unwrap_or_else(|| bad_metrics_line(line));
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices();
            let mut key = String::new();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '}' => {
                        end = Some(i + 1);
                        break;
                    }
                    ',' | ' ' => {}
                    '=' => {
                        if chars.next().map(|(_, c)| c) != Some('"') {
                            bad_metrics_line(line);
                        }
                        let mut val = String::new();
                        loop {
                            match chars.next().map(|(_, c)| c) {
                                Some('"') => break,
                                Some('\\') => match chars.next().map(|(_, c)| c) {
                                    Some('n') => val.push('\n'),
                                    Some(c) => val.push(c),
                                    None => bad_metrics_line(line),
                                },
                                Some(c) => val.push(c),
                                None => bad_metrics_line(line),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), val);
                    }
                    c => key.push(c),
                }
            }
            rest = &r[end.unwrap_or_else(|| bad_metrics_line(line))..];
        }
        let value = rest
            .split_whitespace()
            .next()
            .and_then(|v| match v {
                "+Inf" => Some(f64::INFINITY),
                "-Inf" => Some(f64::NEG_INFINITY),
                v => v.parse().ok(),
            })
            .unwrap_or_else(|| bad_metrics_line(line));
        out.push(MetricSample {
            name,
            labels,
            value,
        });
    }
    out
}

/// The value of one series written exactly as exposed (`name` or `name{label="v"}`); `None`
/// when absent.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, v) = l.trim().rsplit_once(' ')?;
        (name == series).then(|| v.parse().ok()).flatten()
    })
}

/// The sum of the samples named `name` whose labels include every `labels` pair (0 when none).
pub fn metric_sum(samples: &[MetricSample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .sum()
}
