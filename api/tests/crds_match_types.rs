//! `crds/` must be what the Rust types generate; regenerate with
//! `cargo run -p matchfleet-api --bin crdgen` (or `make generate`).

#[test]
fn committed_crds_match_the_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for (file, generated) in matchfleet_api::crd_documents() {
        let committed = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        assert!(
            committed == generated,
            "crds/{file} is out of date with the Rust types: run `make generate` and commit the result"
        );
    }
}
