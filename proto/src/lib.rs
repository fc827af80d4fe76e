//! The husk agent API. Its .proto and generated code arrive with the agent.
