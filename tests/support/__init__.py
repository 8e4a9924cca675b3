"""Helpers shared by test modules (conftest files hold only fixtures)."""
