"""TabPFN and TabICL with their rows sharded over the sp group by Mosaic: models and estimators."""
