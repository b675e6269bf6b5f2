//! Topic names: the template rows are routed by, the globs of topics rows may reach, and
//! Kafka's own rules for a name. Pure: nothing here asks the cluster.

use super::park::{ParkReason, QUOTED_BYTES, printable};

/// Kafka's own limit on topic name length.
pub(crate) const MAX_TOPIC_LEN: usize = 249;

/// A topic name with `{aggregate_type}` and `{event_type}` placeholders.
#[derive(Debug, Clone)]
pub struct TopicTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Literal(String),
    AggregateType,
    EventType,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("unknown placeholder `{{{0}}}`; use {{aggregate_type}} or {{event_type}}")]
    UnknownPlaceholder(String),
    #[error("unclosed `{{` in the template")]
    Unclosed,
    #[error("the template is empty")]
    Empty,
    #[error("`{0}` is not allowed in a Kafka topic name (use letters, digits, '.', '_', '-')")]
    BadCharacter(char),
}

impl TopicTemplate {
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        if template.is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(start) = rest.find('{') {
            if start > 0 {
                parts.push(Part::Literal(rest[..start].to_string()));
            }
            let end = rest[start..].find('}').ok_or(TemplateError::Unclosed)? + start;
            parts.push(match &rest[start + 1..end] {
                "aggregate_type" => Part::AggregateType,
                "event_type" => Part::EventType,
                other => return Err(TemplateError::UnknownPlaceholder(other.to_string())),
            });
            rest = &rest[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        for part in &parts {
            if let Part::Literal(text) = part {
                if let Some(c) = text.chars().find(|c| !is_topic_char(*c)) {
                    return Err(TemplateError::BadCharacter(c));
                }
            }
        }
        Ok(Self { parts })
    }

    pub fn uses_event_type(&self) -> bool {
        self.parts
            .iter()
            .any(|part| matches!(part, Part::EventType))
    }

    /// Every topic the template can render, as a glob: each placeholder becomes `*`.
    pub fn glob(&self) -> String {
        self.parts
            .iter()
            .map(|part| match part {
                Part::Literal(text) => text.as_str(),
                Part::AggregateType | Part::EventType => "*",
            })
            .collect()
    }

    pub fn render(&self, aggregate_type: &str, event_type: &str) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::AggregateType => out.push_str(aggregate_type),
                Part::EventType => out.push_str(event_type),
            }
        }
        out
    }
}

fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Whether `glob` is a well-formed topic glob: topic characters, `*` and `?`.
pub fn is_topic_glob(glob: &str) -> bool {
    !glob.is_empty()
        && glob.len() <= MAX_TOPIC_LEN
        && glob
            .chars()
            .all(|c| is_topic_char(c) || matches!(c, '*' | '?'))
}

/// `*` matches any run of characters (dots included), `?` any one.
fn glob_matches(glob: &[u8], text: &[u8]) -> bool {
    let (mut g, mut t) = (0, 0);
    // Where the last `*` was, and the text position it is trying to absorb up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match glob.get(g) {
            Some(b'*') => {
                star = Some((g, t));
                g += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                g += 1;
                t += 1;
            }
            _ => match star {
                Some((star_g, star_t)) => {
                    g = star_g + 1;
                    t = star_t + 1;
                    star = Some((star_g, star_t + 1));
                }
                None => return false,
            },
        }
    }
    glob[g..].iter().all(|&c| c == b'*')
}

/// Which topics rows may be published to. A row names its topic (its `topic` column, or
/// its `aggregate_type` through the template), and rows are written by many services:
/// without this, one could publish into another team's topic or Kafka's internal ones.
#[derive(Debug, Clone)]
pub struct TopicPolicy {
    /// `relay.allowed_topics`, or the template's own glob.
    allowed: Vec<String>,
    /// `relay.row_topics`: whether a row's own `topic` column is honoured.
    row_topics: bool,
}

impl TopicPolicy {
    pub fn new(allowed: Vec<String>, row_topics: bool) -> Self {
        Self {
            allowed,
            row_topics,
        }
    }

    /// A topic beginning with `_` (`__consumer_offsets`, `__transaction_state`,
    /// `_schemas`, `_confluent-…`) is allowed only by a glob that begins with `_` itself,
    /// never by a catch-all such as `*`.
    pub fn check(&self, topic: &str, from_row: bool) -> Result<(), ParkReason> {
        if from_row && !self.row_topics {
            return Err(ParkReason::TopicNotAllowed(format!(
                "the row names its own topic `{}`, and relay.row_topics = false",
                printable(topic, QUOTED_BYTES)
            )));
        }
        let internal = topic.starts_with('_');
        let allowed = self.allowed.iter().any(|glob| {
            (!internal || glob.starts_with('_')) && glob_matches(glob.as_bytes(), topic.as_bytes())
        });
        if allowed {
            Ok(())
        } else {
            Err(ParkReason::TopicNotAllowed(format!(
                "`{}` matches none of relay.allowed_topics ({}){}",
                printable(topic, QUOTED_BYTES),
                self.allowed.join(", "),
                if internal {
                    "; a topic beginning with `_` needs a pattern beginning with `_`"
                } else {
                    ""
                }
            )))
        }
    }
}

/// Whether `topic` is a name Kafka accepts.
pub(crate) fn validate_topic(topic: &str) -> Result<(), ParkReason> {
    if topic.is_empty() {
        return Err(ParkReason::InvalidTopic("the topic is empty".into()));
    }
    if topic == "." || topic == ".." {
        return Err(ParkReason::InvalidTopic(format!("`{topic}` is reserved")));
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(ParkReason::InvalidTopic(format!(
            "{} characters, Kafka allows {MAX_TOPIC_LEN}",
            topic.len()
        )));
    }
    if let Some(c) = topic.chars().find(|c| !is_topic_char(*c)) {
        return Err(ParkReason::InvalidTopic(format!(
            "`{}` contains {c:?}; topic names use letters, digits, '.', '_' and '-'",
            printable(topic, QUOTED_BYTES)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_placeholders() {
        let t = TopicTemplate::parse("{aggregate_type}-{event_type}.v1").unwrap();
        assert_eq!(t.render("order", "Placed"), "order-Placed.v1");
        assert_eq!(
            TopicTemplate::parse("x.{id}").unwrap_err(),
            TemplateError::UnknownPlaceholder("id".into())
        );
        assert_eq!(
            TopicTemplate::parse("x.{").unwrap_err(),
            TemplateError::Unclosed
        );
        assert_eq!(
            TopicTemplate::parse("a b").unwrap_err(),
            TemplateError::BadCharacter(' ')
        );
    }
}
