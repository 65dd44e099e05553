//! `kubelet-sim`: serves the kubelet API with generated payloads (see `nodegate_tests::sim`).

fn main() {}
