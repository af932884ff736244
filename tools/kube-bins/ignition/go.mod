// Consumer module that builds ignition-validate, the judge of every Ignition
// config cluster-agent renders (tests/provisioning.rs). Kept apart from the
// butane module so minimal version selection does not raise the dependencies
// the two share: each binary is built with its own release's pins.
module cluster-agent.tools/kube-bins/ignition

go 1.24.0

tool github.com/coreos/ignition/v2/validate

require (
	github.com/aws/aws-sdk-go-v2 v1.41.1 // indirect
	github.com/coreos/go-json v0.0.0-20230131223807-18775e0fb4fb // indirect
	github.com/coreos/go-semver v0.3.1 // indirect
	github.com/coreos/go-systemd/v22 v22.6.0 // indirect
	github.com/coreos/ignition/v2 v2.26.0 // indirect
	github.com/coreos/vcontext v0.0.0-20230201181013-d72178a18687 // indirect
	github.com/vincent-petithory/dataurl v1.0.0 // indirect
)
