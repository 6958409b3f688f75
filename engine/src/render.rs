//! Human-readable output shared by the commands: sizes, times, and the backup tree drawn as a tree.

use std::collections::HashMap;
use std::fmt::Write as _;

use chain::{Manifest, Node};

/// `1536` → `1.5 KiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Bytes the node's files hold on the host.
pub fn node_size(node: &Node) -> u64 {
    node.disks.iter().map(|d| d.allocated_bytes).sum()
}

/// "no node or tag X in VM Y", with near matches, for a mistyped id or tag.
pub fn not_found(manifest: &Manifest, wanted: &str) -> String {
    let near = manifest.near_matches(wanted);
    let mut msg = format!("no node or tag {wanted:?} in VM {}", manifest.vm);
    if near.is_empty() {
        msg.push_str("; `qmpbak list REPO/VM` shows the tree");
    } else {
        let _ = write!(msg, "; did you mean {}?", near.join(", "));
    }
    msg
}

/// One line describing a node (without tree drawing), appended to `out`. Written field by field: `list` draws
/// tens of thousands of these.
pub fn write_node_line(out: &mut String, node: &Node, current: bool) {
    use chrono::{Datelike as _, Timelike as _};
    let t = node.created;
    let _ = write!(
        out,
        "{}  {:<12} {:04}-{:02}-{:02} {:02}:{:02}:{:02}  {:>10}  {:<8}  lid {}..{}",
        node.id,
        node.kind,
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        bytes(node_size(node)),
        node.state,
        node.lid,
        node.tid
    );
    if let Some(tag) = &node.tag {
        let _ = write!(out, "  tag {tag}");
    }
    if current {
        out.push_str("  <- current");
    }
}

/// One line describing a node (without tree drawing).
pub fn node_line(node: &Node, current: bool) -> String {
    let mut line = String::new();
    write_node_line(&mut line, node, current);
    line
}

/// Branch levels drawn with indentation; deeper ones are drawn at this depth, marked with their real depth.
pub const MAX_DRAWN_DEPTH: usize = 16;

/// The whole tree of a manifest, one node a line in creation order. A node's only child continues straight
/// below it; only branches (a node with several children) indent, and no deeper than [`MAX_DRAWN_DEPTH`]
/// levels: a deeper branch says "(depth N)". So the drawing grows with the number of nodes, never with the
/// depth of a chain.
pub fn tree(manifest: &Manifest) -> String {
    let mut children: HashMap<&str, Vec<&Node>> = HashMap::new();
    let mut roots = Vec::new();
    for node in &manifest.nodes {
        match &node.parent {
            Some(parent) => children.entry(parent.as_str()).or_default().push(node),
            None => roots.push(node),
        }
    }
    let current = manifest.current.as_ref().map(chain::NodeId::as_str);
    let mut out = String::new();
    // Iterative depth-first walk: (node, what goes before its line, the prefix of what is drawn below it,
    // its branch depth).
    let mut stack: Vec<(&Node, String, String, usize)> = roots
        .iter()
        .rev()
        .map(|n| (*n, String::new(), String::new(), 0))
        .collect();
    while let Some((node, lead, prefix, depth)) = stack.pop() {
        out.push_str(&lead);
        write_node_line(&mut out, node, current == Some(node.id.as_str()));
        out.push('\n');
        let kids = children
            .get(node.id.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        if let [only] = kids {
            stack.push((only, prefix.clone(), prefix, depth));
            continue;
        }
        let depth = depth + 1;
        for (i, kid) in kids.iter().enumerate().rev() {
            let last = i + 1 == kids.len();
            let (connector, below) = if last {
                ("└── ", "    ")
            } else {
                ("├── ", "│   ")
            };
            if depth > MAX_DRAWN_DEPTH {
                let lead = format!("{prefix}{connector}(depth {depth}) ");
                stack.push((kid, lead, prefix.clone(), depth));
            } else {
                stack.push((
                    kid,
                    format!("{prefix}{connector}"),
                    format!("{prefix}{below}"),
                    depth,
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(parents: &[Option<usize>]) -> Manifest {
        let mut m: Manifest = serde_json::from_value(serde_json::json!({
            "format_version": 1, "vm": "vm", "chain_id": "0123abcd", "created": "2025-01-01T00:00:00Z",
            "next_seq": 1, "disks": [], "nodes": [], "current": null, "operations": []
        }))
        .unwrap();
        for (i, parent) in parents.iter().enumerate() {
            let id = chain::NodeId::from_seq(i as u64 + 1);
            let node = serde_json::json!({
                "id": id, "parent": parent.map(|p| chain::NodeId::from_seq(p as u64 + 1)),
                "kind": if parent.is_some() { "incremental" } else { "full" },
                "created": "2025-01-01T00:00:00Z", "state": "complete", "lid": 0, "tid": 0, "disks": []
            });
            m.add_node(serde_json::from_value(node).unwrap()).unwrap();
        }
        m
    }

    /// The drawing in front of each node line.
    fn drawing(text: &str) -> Vec<String> {
        text.lines()
            .map(|l| l[..l.find("00").unwrap()].to_owned())
            .collect()
    }

    #[test]
    fn a_chain_is_drawn_straight_and_only_branches_indent() {
        // 1 - 2 - 3, and 4 - 5 off 2.
        let m = manifest(&[None, Some(0), Some(1), Some(1), Some(3)]);
        assert_eq!(
            drawing(&tree(&m)),
            ["", "", "├── ", "└── ", "    "],
            "{}",
            tree(&m)
        );
    }

    #[test]
    fn deep_branches_stop_indenting_and_say_their_depth() {
        // A comb: every spine node has a leaf and the next spine node.
        let parents: Vec<Option<usize>> = (0..60)
            .map(|i: usize| match i {
                0 => None,
                i if i % 2 == 0 => Some(i - 2),
                i => Some(i - 1),
            })
            .collect();
        let text = tree(&manifest(&parents));
        let widest = drawing(&text).iter().map(|d| d.chars().count()).max().unwrap();
        assert!(widest <= MAX_DRAWN_DEPTH * 4 + 20, "{text}");
        assert!(
            text.contains("(depth 17) ") && text.contains("(depth 29) "),
            "{text}"
        );
    }

    #[test]
    fn bytes_are_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
    }
}
