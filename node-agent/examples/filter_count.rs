//! Filters one capture, repeated to about 2 MiB, the way the bench does (64 KiB chunks), and
//! prints the sizes and stats: a deterministic run for `valgrind --tool=callgrind`.
//!
//! `filter_count CAPTURE NAMESPACE|all [OUTPUT]` (with OUTPUT, the filtered body is written there,
//! to compare two builds byte for byte).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use nodegate_agent::prometheus::{Filter, FilterConfig, FilterRules, Format, Grant};
use nodegate_crds::ResolvedNamespaces;
use std::sync::Arc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let capture = std::fs::read(&args[1]).unwrap();
    let ns = &args[2];
    let data = capture.repeat((2usize << 20).div_ceil(capture.len()));
    let namespaces = if ns == "all" {
        ResolvedNamespaces {
            all: true,
            names: vec![],
        }
    } else {
        ResolvedNamespaces {
            all: false,
            names: vec![ns.clone()],
        }
    };
    let config = FilterConfig {
        grants: vec![Grant {
            namespaces,
            metrics: None,
        }],
    };
    let rules = Arc::new(FilterRules::new(&config).unwrap());
    let mut out = Vec::with_capacity(data.len());
    let mut f = Filter::new(rules, Format::Text);
    for c in data.chunks(64 << 10) {
        f.push(c, &mut out);
    }
    f.finish(&mut out);
    println!("{} {} {:?}", data.len(), out.len(), f.stats());
    if let Some(path) = args.get(3) {
        std::fs::write(path, &out).unwrap();
    }
}
