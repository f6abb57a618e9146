"""Model calls: the LLM judge, policy-rule extraction, and the JSON-Schema-constrained ask they share."""
