"""Model families (adapters), the CTranslate2 converter and the bundled model."""
