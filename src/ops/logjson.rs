//! The log's lines in JSON mode (`[log] format = "json"`): one object a line, with time, level,
//! generation and message first and a record's key-value fields after them, and nothing in it
//! that acts on a terminal (`text::json_inert`). A leaf of `ops::logging`.

/// One record as a JSON object.
pub(super) fn line(ts: &str, generation: u64, record: &log::Record<'_>) -> String {
    struct Fields(serde_json::Map<String, serde_json::Value>);
    impl<'kvs> log::kv::VisitSource<'kvs> for Fields {
        fn visit_pair(
            &mut self,
            key: log::kv::Key<'kvs>,
            value: log::kv::Value<'kvs>,
        ) -> Result<(), log::kv::Error> {
            let v = if let Some(n) = value.to_u64() {
                serde_json::Value::from(n)
            } else if let Some(n) = value.to_i64() {
                serde_json::Value::from(n)
            } else if let Some(f) = value.to_f64() {
                serde_json::Value::from(f)
            } else if let Some(b) = value.to_bool() {
                serde_json::Value::from(b)
            } else {
                serde_json::Value::from(value.to_string())
            };
            self.0.insert(key.as_str().to_string(), v);
            Ok(())
        }
    }
    let level = record.level().as_str().to_ascii_lowercase();
    let message = crate::text::cut(&record.args().to_string(), 16 << 10).into_owned();
    let mut fields = Fields(head(ts, &level, generation, &message));
    let _ = record.key_values().visit(&mut fields);
    text(fields.0)
}

/// What every JSON line begins with: time, level, generation (once known), message.
pub(super) fn head(
    ts: &str,
    level: &str,
    g: u64,
    message: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let mut o = serde_json::Map::new();
    o.insert("time".into(), ts.into());
    o.insert("level".into(), level.into());
    if g != 0 {
        o.insert("generation".into(), g.into());
    }
    o.insert("message".into(), message.into());
    o
}

/// A JSON line's text, with nothing in it that acts on a terminal ([`crate::text::json_inert`]).
pub(super) fn text(o: serde_json::Map<String, serde_json::Value>) -> String {
    crate::text::json_inert(serde_json::Value::Object(o).to_string())
}
