//! nodegate-agent: the kubelet API front (pipeline arrives with the agent issue).
