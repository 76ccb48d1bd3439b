"""Django's PostgreSQL backend with a deadline on the server's answers: ENGINE "clipsite.postgresql"."""
