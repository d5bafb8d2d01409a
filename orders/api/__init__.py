"""HTTP only: parse, authorise, call the service layer, shape the answer. No SQL here."""
