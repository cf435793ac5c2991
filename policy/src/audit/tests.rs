use capgate_schema::Catalog;

use super::*;

const SCHEMA: &[u8] = include_bytes!("../../../schema/fixtures/audit.cgr");
const POLICY: &str = include_str!("../../../schema/fixtures/audit.toml");

fn fixture(policy: &str) -> AuditReport {
    let catalog = Catalog::from_code_generator_request(SCHEMA).unwrap();
    let policy = Policy::parse("audit.toml", policy, &catalog).unwrap();
    audit(&policy, &catalog, catalog.interface("Gate").unwrap())
}

#[test]
fn print() {
    let r = fixture(POLICY);
    println!("{r}");
    println!("{r:#?}");
}
