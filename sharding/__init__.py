"""Device mesh, logical-axis rules and expert parallelism. Every collective of the project lives here."""
