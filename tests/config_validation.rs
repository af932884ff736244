use std::path::PathBuf;
fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(case)
}
#[test]
fn dump() {
    for e in
        std::fs::read_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config"))
            .unwrap()
    {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        println!("=== {name}");
        match cluster_agent::config::load(&fixture(&name)) {
            Ok(c) => println!("OK {:?}", c),
            Err(cluster_agent::config::ConfigError::Invalid { report, .. }) => println!("{report}"),
            Err(e) => println!("IO {e}"),
        }
    }
}
