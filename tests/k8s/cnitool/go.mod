// Builds cnitool (the reference libcni driver) at a release tag; see ../control-plane.sh.
module starling.dev/tests/k8s/cnitool

go 1.24.0

require github.com/containernetworking/cni v1.3.0 // indirect

tool github.com/containernetworking/cni/cnitool
