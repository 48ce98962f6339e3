"""The CDS service: results API, CDS Hooks 2.0 endpoints, FHIR R4 Observation, review app."""
