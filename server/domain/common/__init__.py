"""The shared kernel: ids, resource names, the clock, listing (filters, order, page
tokens), field masks, input validation, addresses and the domain's errors. Imports no
aggregate."""
