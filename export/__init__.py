"""PerCo Engine torch side: model definitions, checkpoint loading, the reference backend."""
