//! A YAML document as a tree whose every node knows its line and column.
//!
//! serde stops at the first error and forgets positions once a value is
//! converted, but the loader must report every problem at once, each at the
//! exact position of the offending value. So YAML is first turned into this
//! tree (from the event stream of `granit_parser`, the parser serde-saphyr is
//! built on and re-exports) and the schema is then walked by hand in `raw.rs`.

use std::borrow::Cow;
use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle, ScanError, Span};

/// 1-based line and column of a node's first character.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    fn of(span: &Span) -> Pos {
        Pos {
            line: span.start.line(),
            // granit counts columns from 0, editors and compilers from 1.
            column: span.start.col() + 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// Scalars keep their source text: typing happens later, per field, so
    /// that `k8s_version: 1.30` stays `"1.30"` rather than becoming `1.3`.
    Scalar {
        text: String,
        /// Plain (unquoted, untagged) scalars may be null, numbers or
        /// booleans; quoted ones are always strings.
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub kind: Kind,
}

impl Node {
    /// YAML's null spellings, plus the empty value of `key:`.
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { text, plain: true }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// How the node is named in "expected X, got Y" messages.
    pub fn describe(&self) -> &'static str {
        match &self.kind {
            _ if self.is_null() => "nothing",
            Kind::Scalar { .. } => "a scalar",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }
}

/// A syntax problem, already positioned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

impl From<ScanError> for SyntaxError {
    fn from(e: ScanError) -> Self {
        let mark = e.marker();
        SyntaxError {
            pos: Pos {
                line: mark.line(),
                column: mark.col() + 1,
            },
            message: format!("invalid YAML: {}", e.info()),
        }
    }
}

/// Aliases are expanded by copying, so a few nested anchors could otherwise
/// blow up into billions of nodes ("billion laughs"). No real cluster config
/// comes anywhere near this.
const MAX_NODES: usize = 100_000;

/// Parses one YAML document. `Ok(None)` for an empty file.
pub fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut builder = Builder {
        events: Parser::new_from_str(text),
        anchors: HashMap::new(),
        nodes: 0,
    };
    builder.document()
}

struct Builder<'a> {
    events: Parser<'a, serde_saphyr::granit_parser::StrInput<'a>>,
    anchors: HashMap<usize, Node>,
    nodes: usize,
}

impl<'a> Builder<'a> {
    /// Next event that carries data (comments are presentation only).
    fn next(&mut self) -> Result<Option<(Event<'a>, Span)>, SyntaxError> {
        loop {
            match self.events.next() {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok((Event::Comment(..), _))) => continue,
                Some(Ok(other)) => return Ok(Some(other)),
            }
        }
    }

    fn expect_next(&mut self) -> Result<(Event<'a>, Span), SyntaxError> {
        self.next()?.ok_or_else(|| SyntaxError {
            pos: Pos::default(),
            message: "invalid YAML: unexpected end of input".into(),
        })
    }

    fn document(&mut self) -> Result<Option<Node>, SyntaxError> {
        let mut root = None;
        while let Some((event, span)) = self.next()? {
            match event {
                Event::StreamStart | Event::DocumentEnd => {}
                Event::StreamEnd => break,
                Event::DocumentStart(..) => {
                    if root.is_some() {
                        return Err(SyntaxError {
                            pos: Pos::of(&span),
                            message: "expected a single YAML document, found a second one".into(),
                        });
                    }
                    let (event, span) = self.expect_next()?;
                    if matches!(event, Event::DocumentEnd) {
                        continue;
                    }
                    root = Some(self.node(event, span)?);
                }
                _ => {
                    return Err(SyntaxError {
                        pos: Pos::of(&span),
                        message: "invalid YAML: unexpected event outside a document".into(),
                    });
                }
            }
        }
        Ok(root)
    }

    fn count(&mut self, pos: Pos, n: usize) -> Result<(), SyntaxError> {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > MAX_NODES {
            return Err(SyntaxError {
                pos,
                message: format!(
                    "document too large (more than {MAX_NODES} nodes after expanding aliases)"
                ),
            });
        }
        Ok(())
    }

    fn node(&mut self, event: Event<'a>, span: Span) -> Result<Node, SyntaxError> {
        let pos = Pos::of(&span);
        self.count(pos, 1)?;
        let (node, anchor) = match event {
            Event::Scalar(text, style, anchor, tag) => {
                let plain = style == ScalarStyle::Plain && tag.is_none();
                let text = match text {
                    Cow::Borrowed(s) => s.to_owned(),
                    Cow::Owned(s) => s,
                };
                let kind = Kind::Scalar { text, plain };
                (Node { pos, kind }, anchor)
            }
            Event::SequenceStart(_, anchor, _) => {
                let mut items = Vec::new();
                loop {
                    let (event, span) = self.expect_next()?;
                    if matches!(event, Event::SequenceEnd) {
                        break;
                    }
                    items.push(self.node(event, span)?);
                }
                let kind = Kind::Seq(items);
                (Node { pos, kind }, anchor)
            }
            Event::MappingStart(_, anchor, _) => {
                let mut entries = Vec::new();
                loop {
                    let (event, span) = self.expect_next()?;
                    if matches!(event, Event::MappingEnd) {
                        break;
                    }
                    let key = self.node(event, span)?;
                    let (event, span) = self.expect_next()?;
                    let value = self.node(event, span)?;
                    entries.push((key, value));
                }
                let kind = Kind::Map(entries);
                (Node { pos, kind }, anchor)
            }
            Event::Alias(id) => {
                let target = self.anchors.get(&id).cloned().ok_or(SyntaxError {
                    pos,
                    message: "invalid YAML: alias to an unknown anchor".into(),
                })?;
                self.count(pos, weight(&target))?;
                // Errors inside an alias are reported where the alias is used.
                return Ok(relocate(target, pos));
            }
            _ => {
                return Err(SyntaxError {
                    pos,
                    message: "invalid YAML: expected a value".into(),
                });
            }
        };
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        Ok(node)
    }
}

fn weight(node: &Node) -> usize {
    match &node.kind {
        Kind::Scalar { .. } => 1,
        Kind::Seq(items) => 1 + items.iter().map(weight).sum::<usize>(),
        Kind::Map(entries) => {
            1 + entries
                .iter()
                .map(|(k, v)| weight(k) + weight(v))
                .sum::<usize>()
        }
    }
}

fn relocate(mut node: Node, pos: Pos) -> Node {
    node.pos = pos;
    node.kind = match node.kind {
        Kind::Seq(items) => Kind::Seq(items.into_iter().map(|n| relocate(n, pos)).collect()),
        Kind::Map(entries) => Kind::Map(
            entries
                .into_iter()
                .map(|(k, v)| (relocate(k, pos), relocate(v, pos)))
                .collect(),
        ),
        scalar => scalar,
    };
    node
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(node: &Node) -> &str {
        match &node.kind {
            Kind::Scalar { text, .. } => text,
            _ => panic!("not a scalar: {node:?}"),
        }
    }

    #[test]
    fn positions_are_one_based_and_point_at_values() {
        let root = parse("a: 1\nlist:\n  - x\n  - \"y\"\n").unwrap().unwrap();
        let Kind::Map(entries) = &root.kind else {
            panic!()
        };
        assert_eq!(entries[0].1.pos, Pos { line: 1, column: 4 });
        let Kind::Seq(items) = &entries[1].1.kind else {
            panic!()
        };
        assert_eq!(items[1].pos, Pos { line: 4, column: 5 });
        assert_eq!(scalar(&items[1]), "y");
        assert_eq!(
            items[1].kind,
            Kind::Scalar {
                text: "y".into(),
                plain: false
            }
        );
    }

    #[test]
    fn keeps_scalar_text_verbatim() {
        let root = parse("v: 1.30\n").unwrap().unwrap();
        let Kind::Map(entries) = &root.kind else {
            panic!()
        };
        assert_eq!(scalar(&entries[0].1), "1.30");
    }

    #[test]
    fn empty_document_is_none() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("# only a comment\n").unwrap(), None);
    }

    #[test]
    fn syntax_error_has_position() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.pos.line >= 1, "{err:?}");
        assert!(err.message.starts_with("invalid YAML"));
    }

    #[test]
    fn second_document_is_rejected() {
        let err = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(err.pos.line, 2);
    }

    #[test]
    fn alias_bombs_are_bounded() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("too large"), "{err:?}");
    }
}
