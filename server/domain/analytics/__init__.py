"""Analytics: every call's outcome, counted per minute by method, code and reason, for
error rates and the top errors over a window with their trend."""
