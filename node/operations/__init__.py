"""Operations of the admin API: one module per family, one registry for all."""
