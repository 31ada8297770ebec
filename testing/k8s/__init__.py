"""The manifests rendered, validated and run without a cluster: kubectl kustomize, strict CRD
schemas, the operators' admission rules, and pods started as processes (`make k8s-check`)."""
