//! The lid/tid tree against naive parent-link walks: hand-made trees first, then random ones (random inserts
//! under random parents, leaf deletes, reparenting deletes and moves) checked after every step.

#![allow(clippy::unwrap_used, clippy::many_single_char_names)] // tests: nodes a, b, c …; unwrap fails the test

mod common;

use chain::{Error, Manifest, NodeId, NodeKind};
use chrono::Utc;
use common::{add, ids, naive_chain, naive_children, naive_numbering, naive_preorder, node};
use proptest::prelude::*;

/// Every query of the manifest's tree agrees with its naive version, for every node.
fn check_against_naive(m: &Manifest) {
    let nodes = &m.nodes;
    let expected = naive_numbering(nodes);
    assert_eq!(expected.len(), nodes.len(), "every node is numbered");
    for (id, lid, tid) in &expected {
        let n = m.node(id).unwrap();
        assert_eq!((n.lid, n.tid), (*lid, *tid), "numbering of {id}");
    }
    let tree = m.tree().unwrap();
    let naive_leaves: Vec<_> = tree
        .preorder()
        .filter(|n| naive_children(nodes, Some(&n.id)).is_empty())
        .collect();
    assert_eq!(ids(&tree.leaves()), ids(&naive_leaves));
    let naive_roots = naive_children(nodes, None);
    assert_eq!(ids(&tree.roots()), ids(&naive_roots));
    for n in nodes {
        let id = n.id.as_str();
        let chain = naive_chain(nodes, &n.id);
        assert_eq!(
            ids(&tree.recovery_chain(id).unwrap()),
            ids(&chain),
            "recovery chain of {id}"
        );
        assert_eq!(
            ids(&tree.ancestors(id).unwrap()),
            ids(&chain[..chain.len() - 1]),
            "ancestors of {id}"
        );
        assert_eq!(
            ids(&tree.children(id).unwrap()),
            ids(&naive_children(nodes, Some(&n.id))),
            "children of {id}"
        );
        let mut sub = Vec::new();
        naive_preorder(nodes, &n.id, &mut sub);
        assert_eq!(ids(&tree.subtree(id).unwrap()), ids(&sub), "subtree of {id}");
        // The newest leaf below: the leaf of the subtree that comes last in the node list.
        let position = |x: &chain::Node| nodes.iter().position(|y| y.id == x.id).unwrap();
        let head = sub
            .iter()
            .filter(|x| naive_children(nodes, Some(&x.id)).is_empty())
            .max_by_key(|x| position(x));
        assert_eq!(
            tree.branch_head(id).map(|h| &h.id),
            head.map(|h| &h.id),
            "branch head of {id}"
        );
        let full = chain
            .iter()
            .rev()
            .find(|x| x.kind == NodeKind::Full)
            .map(|x| &x.id);
        assert_eq!(
            tree.last_full(id).unwrap().map(|f| &f.id),
            full,
            "last full of {id}"
        );
    }
    // Unions of subtrees: every third node, and every node, against the naive walks.
    for step in [3, 1] {
        let picked: Vec<&str> = nodes.iter().step_by(step).map(|n| n.id.as_str()).collect();
        let mut naive_union = Vec::new();
        for id in &picked {
            naive_preorder(nodes, &NodeId::new(*id).unwrap(), &mut naive_union);
        }
        let mut naive_ids = ids(&naive_union);
        naive_ids.sort();
        naive_ids.dedup();
        let mut union = ids(&tree.subtrees(picked.iter().copied()).unwrap());
        let in_preorder = union.clone();
        union.sort();
        assert_eq!(union, naive_ids, "union of subtrees, every {step}th node");
        assert_eq!(union.len(), in_preorder.len(), "each node once");
    }
    assert!(tree.subtrees(["nope"]).is_none());
    m.validate().unwrap();
}

fn id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

#[test]
fn a_small_forest_numbers_in_preorder() {
    let mut m = Manifest::new("vm", Utc::now());
    let a = add(&mut m, None); // 0001
    let b = add(&mut m, Some(&a)); // 0002
    let c = add(&mut m, Some(&b)); // 0003
    let d = add(&mut m, Some(&a)); // 0004: a second branch from the full
    let e = add(&mut m, None); // 0005: a second full
    let f = add(&mut m, Some(&e)); // 0006
    let numbers: Vec<_> = m.nodes.iter().map(|n| (n.id.to_string(), n.lid, n.tid)).collect();
    let expect = [
        ("0001", 1, 4),
        ("0002", 2, 3),
        ("0003", 3, 3),
        ("0004", 4, 4),
        ("0005", 5, 6),
        ("0006", 6, 6),
    ];
    let expect: Vec<_> = expect.iter().map(|(i, l, t)| ((*i).to_owned(), *l, *t)).collect();
    assert_eq!(numbers, expect);
    assert_eq!(ids(&m.recovery_chain(&c).unwrap()), ["0001", "0002", "0003"]);
    assert_eq!(ids(&m.children(&a).unwrap()), ["0002", "0004"]);
    assert_eq!(ids(&m.subtree(&b).unwrap()), ["0002", "0003"]);
    assert_eq!(ids(&m.leaves().unwrap()), ["0003", "0004", "0006"]);
    assert_eq!(m.branch_head(&a).unwrap().id, d);
    assert_eq!(m.last_full(&f).unwrap().unwrap().id, e);
    assert_eq!(ids(&m.ancestors(&f).unwrap()), ["0005"]);
    check_against_naive(&m);
}

#[test]
fn removing_nodes() {
    let mut m = Manifest::new("vm", Utc::now());
    let a = add(&mut m, None);
    let b = add(&mut m, Some(&a));
    let c = add(&mut m, Some(&b));
    let d = add(&mut m, Some(&b));
    m.current = Some(d.clone());

    let err = m.remove_node(&b).unwrap_err();
    let Error::NotALeaf { node, children, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(node, &b);
    assert_eq!(children, &[c.clone(), d.clone()]);
    assert!(err.to_string().contains("0003, 0004"), "{err}");

    // Merging 0002 into its children: they move up to 0001.
    let removed = m.remove_node_reparent(&b).unwrap();
    assert_eq!(removed.id, b);
    assert_eq!(ids(&m.children(&a).unwrap()), ["0003", "0004"]);
    check_against_naive(&m);

    // Removing the current node clears `current`.
    m.remove_node(&d).unwrap();
    assert_eq!(m.current, None);
    assert!(matches!(m.remove_node(&d), Err(Error::NodeNotFound { .. })));

    // Removing a root with children makes them roots.
    m.remove_node_reparent(&a).unwrap();
    assert_eq!(m.nodes[0].parent, None);
    check_against_naive(&m);
    // Ids are never reused.
    assert_eq!(m.next_node_id().unwrap(), id("0005"));
}

#[test]
fn adding_checks_the_node() {
    let mut m = Manifest::new("vm", Utc::now());
    let a = add(&mut m, None);
    let err = m.add_node(node(&a, None, NodeKind::Full)).unwrap_err();
    assert!(matches!(err, Error::NodeExists { .. }), "{err:?}");
    let ghost = id("0099");
    let err = m
        .add_node(node(&id("0002"), Some(&ghost), NodeKind::Incremental))
        .unwrap_err();
    assert!(
        matches!(&err, Error::ParentNotFound { parent, .. } if *parent == ghost),
        "{err:?}"
    );
    assert!(err.to_string().contains("0099"), "{err}");
    // A numeric id past next_seq moves it on.
    m.add_node(node(&id("0010"), Some(&a), NodeKind::Incremental))
        .unwrap();
    assert_eq!(m.next_node_id().unwrap(), id("0011"));
    // Tags: valid, unique, not another node's id.
    m.set_tag(&a, Some("golden".into())).unwrap();
    let mut tagged = node(&id("0012"), Some(&a), NodeKind::Incremental);
    tagged.tag = Some("golden".into());
    assert!(matches!(m.add_node(tagged.clone()), Err(Error::TagInUse { .. })));
    tagged.tag = Some("0001".into());
    assert!(matches!(m.add_node(tagged.clone()), Err(Error::TagInUse { .. })));
    tagged.tag = Some("no/slash".into());
    assert!(matches!(
        m.add_node(tagged),
        Err(Error::InvalidName { what: "tag", .. })
    ));
    // Moving a node below itself is refused; elsewhere is fine.
    let b = id("0010");
    assert!(matches!(
        m.reparent(&a, Some(b.clone())),
        Err(Error::MoveIntoOwnSubtree { .. })
    ));
    m.reparent(&b, None).unwrap();
    check_against_naive(&m);
}

#[test]
fn find_and_near_matches() {
    let mut m = Manifest::new("vm", Utc::now());
    let a = add(&mut m, None);
    let b = add(&mut m, Some(&a));
    m.set_tag(&b, Some("before-upgrade".into())).unwrap();
    for _ in 0..10 {
        add(&mut m, Some(&b));
    }
    assert_eq!(m.find("0001").unwrap().id, a);
    assert_eq!(m.find("before-upgrade").unwrap().id, b);
    assert_eq!(m.find("2").unwrap().id, b);
    assert!(m.find("nope").is_none());
    assert_eq!(m.near_matches("before-upgrad"), ["before-upgrade"]);
    assert_eq!(m.near_matches("befor-upgrade"), ["before-upgrade"]);
    assert!(m.near_matches("0013").contains(&"0012".to_owned()));
    assert!(m.near_matches("zzzzzzzz").is_empty());
    assert!(m.near_matches("0001").len() <= 5);
}

#[test]
fn stale_numbering_is_detected_not_used() {
    let mut m = Manifest::new("vm", Utc::now());
    let a = add(&mut m, None);
    let b = add(&mut m, Some(&a));
    m.node_mut(&b).unwrap().lid = 7;
    assert!(matches!(m.tree(), Err(Error::ManifestInconsistent { .. })));
    assert!(matches!(
        m.recovery_chain(&b),
        Err(Error::ManifestInconsistent { .. })
    ));
    m.recompute_numbering().unwrap();
    assert_eq!(ids(&m.recovery_chain(&b).unwrap()), ["0001", "0002"]);
}

#[derive(Debug, Clone)]
enum Op {
    /// Add a node under the node picked by the number (or a new full when 0 mod 5, or when empty).
    Insert(usize),
    /// Remove the picked node if it is a leaf (expect NotALeaf otherwise).
    DeleteLeaf(usize),
    /// Remove the picked node, its children moving to its parent.
    DeleteReparent(usize),
    /// Move the picked node under another picked node (refused below itself).
    Move(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => any::<usize>().prop_map(Op::Insert),
        2 => any::<usize>().prop_map(Op::DeleteLeaf),
        2 => any::<usize>().prop_map(Op::DeleteReparent),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Op::Move(a, b)),
    ]
}

fn apply(m: &mut Manifest, op: &Op) {
    let n = m.nodes.len();
    let pick = |i: usize| m.nodes[i % n].id.clone();
    match *op {
        Op::Insert(i) => {
            let parent = if n == 0 || i % 5 == 0 { None } else { Some(pick(i)) };
            add(m, parent.as_ref());
        }
        _ if n == 0 => {}
        Op::DeleteLeaf(i) => {
            let target = pick(i);
            let has_children = m.nodes.iter().any(|x| x.parent.as_ref() == Some(&target));
            match m.remove_node(&target) {
                Ok(removed) => assert!(!has_children && removed.id == target),
                Err(Error::NotALeaf { .. }) => assert!(has_children),
                Err(e) => panic!("{e}"),
            }
        }
        Op::DeleteReparent(i) => {
            let target = pick(i);
            let parent = m.node(&target).unwrap().parent.clone();
            let children: Vec<NodeId> = m
                .nodes
                .iter()
                .filter(|x| x.parent.as_ref() == Some(&target))
                .map(|x| x.id.clone())
                .collect();
            m.remove_node_reparent(&target).unwrap();
            for child in children {
                assert_eq!(m.node(&child).unwrap().parent, parent);
            }
        }
        Op::Move(a, b) => {
            let (moving, target) = (pick(a), pick(b));
            let below_itself = naive_chain(&m.nodes, &target).iter().any(|x| x.id == moving);
            match m.reparent(&moving, Some(target)) {
                Ok(()) => assert!(!below_itself),
                Err(Error::MoveIntoOwnSubtree { .. }) => assert!(below_itself),
                Err(e) => panic!("{e}"),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_match_naive_walks(ops in prop::collection::vec(op(), 1..60)) {
        let mut m = Manifest::new("vm", Utc::now());
        for op in &ops {
            apply(&mut m, op);
            check_against_naive(&m);
        }
        // And the manifest survives JSON unchanged.
        let json = serde_json::to_string_pretty(&m).unwrap();
        let back: Manifest = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&back, &m);
        back.validate().unwrap();
    }
}
