use serde::Serialize;

use crate::cli::{GlobalArgs, PlanArgs};
use crate::engine::Plan;
use crate::paths::HostPaths;
use crate::phases;

use super::{CliError, EXIT_OK, Target, load_config, print_json, target};

#[derive(Serialize)]
struct PlannedStep {
    name: &'static str,
    summary: &'static str,
}

#[derive(Serialize)]
struct PlannedPhase {
    name: &'static str,
    requires: Vec<&'static str>,
    steps: Vec<PlannedStep>,
}

#[derive(Serialize)]
struct NodePlan {
    #[serde(flatten)]
    target: Target,
    /// Step names in execution order.
    steps: Vec<&'static str>,
    phases: Vec<PlannedPhase>,
}

fn describe(target: Target, plan: &Plan) -> NodePlan {
    NodePlan {
        steps: plan.step_names().map(|(_, s)| s).collect(),
        phases: plan
            .phases
            .iter()
            .map(|p| PlannedPhase {
                name: p.name,
                requires: p.requires.clone(),
                steps: p
                    .steps
                    .iter()
                    .map(|s| PlannedStep {
                        name: s.name(),
                        summary: s.summary(),
                    })
                    .collect(),
            })
            .collect(),
        target,
    }
}

fn print_human(plan: &NodePlan) {
    println!(
        "node {} — role {}, ceph {}",
        plan.target.node,
        plan.target.role,
        serde_json::to_value(plan.target.ceph_role)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    );
    let mut n = 0;
    for phase in &plan.phases {
        let requires = if phase.requires.is_empty() {
            String::new()
        } else {
            format!(" (after {})", phase.requires.join(", "))
        };
        println!("  phase {}{requires}", phase.name);
        for step in &phase.steps {
            n += 1;
            println!("    {n:>2}. {:<24} {}", step.name, step.summary);
        }
    }
}

pub fn plan(global: &GlobalArgs, paths: &HostPaths, args: &PlanArgs) -> Result<i32, CliError> {
    let config = load_config(paths)?;
    let targets: Vec<Target> = if args.all_nodes {
        config
            .nodes
            .iter()
            .map(|n| {
                let scoped = GlobalArgs {
                    node: Some(n.name.clone()),
                    ..global.clone()
                };
                target(&scoped, paths, &config).map(|(_, t)| t)
            })
            .collect::<Result<_, _>>()?
    } else {
        vec![target(global, paths, &config)?.1]
    };
    let plans: Vec<NodePlan> = targets
        .into_iter()
        .map(|t| {
            let plan = phases::build(t.role, t.ceph_role, &config);
            describe(t, &plan)
        })
        .collect();
    match (global.json, args.all_nodes) {
        (true, true) => print_json(&plans),
        (true, false) => print_json(&plans[0]),
        (false, _) => plans.iter().for_each(print_human),
    }
    Ok(EXIT_OK)
}
