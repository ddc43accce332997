"""Offline evaluation: seeded memory-task generators (`generators`), the RAG baseline (`rag`) and
scoring (`metrics`). Nothing here downloads anything."""
