//! Topic routing: `outbox.topic_template` with `${aggregatetype}` and
//! `${type}` placeholders, like Debezium's Outbox Event Router
//! (`route.topic.replacement`, default `outbox.event.${routedByValue}`).

use crate::validate::{self, is_topic_char};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    AggregateType,
    EventType,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<Part>,
}

pub const DEFAULT_TEMPLATE: &str = "outbox.event.${aggregatetype}";

impl TopicTemplate {
    /// Parses a template; the literal parts must already be legal in a topic
    /// name, so that only the substituted values can make a topic invalid.
    pub fn parse(template: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            match rest.find("${") {
                Some(0) => {
                    let end = rest
                        .find('}')
                        .ok_or_else(|| format!("unterminated placeholder in topic template \"{template}\""))?;
                    parts.push(match &rest[2..end] {
                        "aggregatetype" => Part::AggregateType,
                        "type" => Part::EventType,
                        other => {
                            return Err(format!(
                                "unknown placeholder ${{{other}}} in topic template \"{template}\" \
                                 (known: ${{aggregatetype}}, ${{type}})"
                            ))
                        }
                    });
                    rest = &rest[end + 1..];
                }
                found => {
                    let end = found.unwrap_or(rest.len());
                    let lit = &rest[..end];
                    if let Some(bad) = lit.chars().find(|c| !is_topic_char(*c)) {
                        return Err(format!(
                            "topic template \"{template}\" contains the character {bad:?}, which Kafka rejects in topic names"
                        ));
                    }
                    parts.push(Part::Literal(lit.to_owned()));
                    rest = &rest[end..];
                }
            }
        }
        if parts.is_empty() {
            return Err("topic template must not be empty".into());
        }
        Ok(TopicTemplate { parts })
    }

    pub fn render(&self, aggregate_type: &str, event_type: &str) -> String {
        let mut s = String::new();
        for p in &self.parts {
            match p {
                Part::Literal(l) => s.push_str(l),
                Part::AggregateType => s.push_str(aggregate_type),
                Part::EventType => s.push_str(event_type),
            }
        }
        s
    }
}

/// The topic an event goes to: its own override, else the template; either
/// way a name Kafka accepts.
///
/// An override is returned borrowed: the relay routes every event, and most
/// of them carry no allocation worth making.
pub fn route<'a>(
    template: &TopicTemplate,
    topic_override: Option<&'a str>,
    aggregate_type: &str,
    event_type: &str,
) -> Result<std::borrow::Cow<'a, str>, validate::Invalid> {
    let topic = match topic_override {
        Some(t) => std::borrow::Cow::Borrowed(t),
        None => std::borrow::Cow::Owned(template.render(aggregate_type, event_type)),
    };
    validate::topic(&topic).map_err(|mut e| {
        if topic_override.is_none() {
            e.hint = format!(
                "The topic comes from outbox.topic_template with aggregate type \"{aggregate_type}\" and event type \
                 \"{event_type}\": use values that make a legal name, or pass a topic explicitly. {}",
                e.hint
            );
        }
        e
    })?;
    Ok(topic)
}

/// An AMQP routing key: the event's explicit topic (on RabbitMQ it names
/// the routing key) or the template's result. Any text up to 255 bytes (an
/// AMQP short string); empty is refused, as it would reach only bindings
/// made for it by accident.
pub fn routing_key(
    template: &TopicTemplate,
    key_override: Option<&str>,
    aggregate_type: &str,
    event_type: &str,
) -> Result<String, String> {
    let key = match key_override {
        Some(k) => k.to_owned(),
        None => template.render(aggregate_type, event_type),
    };
    if key.is_empty() || key.len() > 255 {
        return Err(format!(
            "routing key \"{}\" must be 1 to 255 bytes, it is {} (from {})",
            key.chars().take(80).collect::<String>(),
            key.len(),
            if key_override.is_some() { "the event's topic" } else { "outbox.amqp_routing_key" }
        ));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_default_to_the_event_type_and_are_bounded() {
        let t = TopicTemplate::parse("${type}").unwrap();
        assert_eq!(routing_key(&t, None, "Order", "Order Created").unwrap(), "Order Created");
        assert_eq!(routing_key(&t, Some("orders.eu"), "Order", "x").unwrap(), "orders.eu");
        assert!(routing_key(&t, None, "Order", "").unwrap_err().contains("1 to 255"));
        assert!(routing_key(&t, None, "Order", &"x".repeat(256)).unwrap_err().contains("it is 256"));
    }

    #[test]
    fn default_template_matches_debezium() {
        let t = TopicTemplate::parse(DEFAULT_TEMPLATE).unwrap();
        assert_eq!(t.render("Order", "OrderPlaced"), "outbox.event.Order");
    }

    #[test]
    fn placeholders_and_literals() {
        let t = TopicTemplate::parse("${aggregatetype}-${type}.v1").unwrap();
        assert_eq!(t.render("Order", "Placed"), "Order-Placed.v1");
        assert_eq!(TopicTemplate::parse("static").unwrap().render("a", "b"), "static");
    }

    #[test]
    fn bad_templates() {
        assert!(TopicTemplate::parse("").is_err());
        assert!(TopicTemplate::parse("x.${aggregatetype").unwrap_err().contains("unterminated"));
        assert!(TopicTemplate::parse("${routedByValue}").unwrap_err().contains("unknown placeholder"));
        assert!(TopicTemplate::parse("a b.${type}").unwrap_err().contains("' '"));
    }

    #[test]
    fn routing_validates_the_result() {
        let t = TopicTemplate::parse(DEFAULT_TEMPLATE).unwrap();
        assert_eq!(route(&t, None, "Order", "x").unwrap(), "outbox.event.Order");
        assert_eq!(route(&t, Some("custom"), "Order", "x").unwrap(), "custom");
        let e = route(&t, None, "Order Line", "x").unwrap_err();
        assert!(e.hint.contains("outbox.topic_template"), "{}", e.hint);
        assert!(route(&t, Some("bad topic"), "Order", "x").is_err());
    }
}
