//! The rules applied to a [`SourceTree`]: layers, circles, the environment, pure modules.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::Rules;
use crate::tree::{Reference, SourceTree};

impl SourceTree {
    /// Every broken rule, as `file:line: what`.
    pub fn check(&self, rules: &Rules) -> Vec<String> {
        let mut problems = Vec::new();
        let layer_of = |module: &str| rules.layers.iter().position(|l| l.contains(&module));
        let mut graph: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
        for (name, file) in &self.files {
            let from_top = file.module.first().map(String::as_str);
            let env_allowed = rules.env_readers.iter().any(|(prefix, _)| name.starts_with(prefix));
            if let Some(top) = from_top
                && top != "<main>"
                && layer_of(top).is_none()
            {
                problems.push(format!("{name}: module `{top}` is in no layer: add it to LAYERS"));
            }
            // Names a file brings in from `std` (`use std::time;`) are not the crates of that name.
            let from_std: Vec<&str> = (file.external.iter())
                .filter(|(path, _, _)| ["std::", "core::", "alloc::"].iter().any(|p| path.starts_with(p)))
                .filter_map(|(path, _, _)| path.rsplit("::").next())
                .collect();
            for (path, line, test) in &file.external {
                let segments: Vec<&str> = path.split("::").collect();
                let env_read = matches!(segments.as_slice(), [.., "env", "var" | "var_os" | "vars" | "vars_os"]);
                if env_read && !env_allowed && !test && !file.test {
                    problems
                        .push(format!("{name}:{line}: reads the environment ({path}); only config/ and main.rs may"));
                }
                let root = segments[0];
                let io_crate =
                    rules.crates.contains(&root) && !rules.pure_crates.contains(&root) && !from_std.contains(&root);
                let io_std = rules.io_std.iter().any(|io| path == io || path.starts_with(&format!("{io}::")));
                if from_top.is_some_and(|t| rules.pure.contains(&t)) && (io_crate || io_std) {
                    problems.push(format!("{name}:{line}: a pure module uses {path}"));
                }
            }
            for r in &file.references {
                let Some(to) = self.resolve(&r.path) else { continue };
                let to_top = r.path[0].as_str();
                if let Some(from) = from_top
                    && from != to_top
                {
                    problems.extend(self.layer_problem(rules, name, from, r, &layer_of));
                }
                let to_module = &self.files[to].module;
                // A module's own submodules are its to use; every other edge counts for circles.
                if to != name && !to_module.starts_with(&file.module) {
                    graph.entry(name.as_str()).or_default().entry(to.as_str()).or_insert(r.line);
                }
            }
        }
        for (group, circle) in circles(&graph) {
            let tolerated = rules.circles.iter().any(|allowed| group.iter().all(|f| allowed.contains(f)));
            if !tolerated {
                let mut text: Vec<String> = circle.iter().map(|(f, line)| format!("{f}:{line}")).collect();
                text.push(circle[0].0.to_string());
                let others = group.len() - circle.len();
                let more = if others > 0 {
                    format!(" (and {others} more files in circles with these)")
                } else {
                    String::new()
                };
                problems.push(format!("import circle: {}{more}", text.join(" → ")));
            }
        }
        problems
    }

    fn layer_problem(
        &self,
        rules: &Rules,
        name: &str,
        from: &str,
        r: &Reference,
        layer_of: &dyn Fn(&str) -> Option<usize>,
    ) -> Option<String> {
        let to = r.path[0].as_str();
        let at = format!("{name}:{}", r.line);
        let shown = r.path.join("::");
        if from == "<main>" {
            return None;
        }
        if rules.layer_exceptions.contains(&(name, to)) {
            return None;
        }
        if let Some((_, never)) = rules.never.iter().find(|(m, _)| *m == from)
            && never.contains(&to)
        {
            return Some(format!("{at}: `{from}` never imports `{to}` ({shown})"));
        }
        if let Some((_, own)) = rules.own_config.iter().find(|(m, _)| *m == from)
            && to == "config"
            && r.path.get(1).map(String::as_str) != Some(own)
        {
            return Some(format!("{at}: `{from}` reads only its own config, `config::{own}` (not {shown})"));
        }
        match (layer_of(from), layer_of(to)) {
            (Some(a), Some(b)) if b < a => None,
            (Some(a), Some(b)) => {
                Some(format!("{at}: `{from}` (layer {a}) imports `{to}` (layer {b}): only lower layers ({shown})"))
            }
            (_, None) => Some(format!("{at}: `{to}` is in no layer: add it to LAYERS ({shown})")),
            (None, _) => None,
        }
    }
}

/// Each strongly connected group of files (Tarjan) and one circle in it: its files in import order
/// with the line of the import to the next.
pub type Circle<'a> = (Vec<&'a str>, Vec<(&'a str, usize)>);

pub fn circles<'a>(graph: &BTreeMap<&'a str, BTreeMap<&'a str, usize>>) -> Vec<Circle<'a>> {
    struct Tarjan<'g, 'a> {
        graph: &'g BTreeMap<&'a str, BTreeMap<&'a str, usize>>,
        index: HashMap<&'a str, usize>,
        low: HashMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        groups: Vec<Vec<&'a str>>,
    }
    impl<'a> Tarjan<'_, 'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for &w in self.graph.get(v).into_iter().flat_map(|e| e.keys()) {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    self.low.insert(v, self.low[v].min(self.low[w]));
                } else if self.on_stack.contains(w) {
                    self.low.insert(v, self.low[v].min(self.index[w]));
                }
            }
            if self.low[v] == self.index[v] {
                let mut group = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    group.push(w);
                    if w == v {
                        break;
                    }
                }
                if group.len() > 1 {
                    self.groups.push(group);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        groups: Vec::new(),
    };
    for &v in graph.keys() {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    t.groups.into_iter().map(|group| (group.clone(), circle_in(graph, &group))).collect()
}

/// A shortest circle through the group's first file, staying in the group (breadth first).
pub fn circle_in<'a>(graph: &BTreeMap<&'a str, BTreeMap<&'a str, usize>>, group: &[&'a str]) -> Vec<(&'a str, usize)> {
    let start = *group.iter().min().expect("a group has files");
    let mut came_from: HashMap<&str, &str> = HashMap::new();
    let mut frontier = vec![start];
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for v in frontier {
            for &w in graph.get(v).into_iter().flat_map(|e| e.keys()) {
                if !group.contains(&w) || came_from.contains_key(w) {
                    continue;
                }
                came_from.insert(w, v);
                if w == start {
                    let mut files = vec![start];
                    let mut at = v;
                    while at != start {
                        files.push(at);
                        at = came_from[at];
                    }
                    files.reverse();
                    files.rotate_right(1);
                    return files
                        .iter()
                        .enumerate()
                        .map(|(k, f)| (*f, graph[f][files[(k + 1) % files.len()]]))
                        .collect();
                }
                next.push(w);
            }
        }
        frontier = next;
    }
    group.iter().map(|f| (*f, 0)).collect()
}
