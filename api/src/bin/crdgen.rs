//! Writes the CRDs of this build to `crds/` (or the folder given as the first argument).

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../crds").to_string());
    std::fs::create_dir_all(&dir)?;
    for (file, yaml) in matchfleet_api::crd_documents() {
        let path = std::path::Path::new(&dir).join(file);
        std::fs::write(&path, yaml)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
