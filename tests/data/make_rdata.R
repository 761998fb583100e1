# Makes the R lazy-load databases under tests/data/rlib/ that tests/test_data_models.py reads:
# the layout Debian's r-cran-janeaustenr and r-cran-tokenizers install (<pkg>/data/Rdata.rdb +
# Rdata.rdx), written by R's own makeLazyLoadDB, with tiny stand-ins for the books.
#
#     cd tests/data && Rscript make_rdata.R      # R 4.2.2 from Debian bookworm (r-base-core)
#
# janeaustenr: character vectors, one element per line, as the package ships them (with an NA
# and non-ASCII text), zlib-compressed records (compress = TRUE, what R CMD INSTALL uses).
# tokenizers: mobydick is one string holding a raw Gutenberg file (BOM, CRLF, START/END markers,
# a licence after the book), in LZMA records (compress = 3, record type 'Z').
# bzip2/Rdata: compress = 2, where R writes a bzip2 record (type '2') for an object that
# compresses and a stored one (type '0') for an object that does not.
lazyload <- function(dir, objects, compress) {
    dir.create(dir, recursive = TRUE, showWarnings = FALSE)
    env <- list2env(objects)
    tools:::makeLazyLoadDB(env, file.path(dir, "Rdata"), compress = compress)
    # (R decides each record's type; the tests check which ones these files hold)
}
book <- function(title) c(toupper(title), "", "by Jane Austen", NA, paste("The text of", title, "- caf\u00e9, na\u00efve."))
lazyload("rlib/janeaustenr/data", list(
    sensesensibility = book("Sense and Sensibility"), prideprejudice = book("Pride and Prejudice"),
    mansfieldpark = book("Mansfield Park"), emma = book("Emma"),
    northangerabbey = book("Northanger Abbey"), persuasion = book("Persuasion")), compress = TRUE)
lazyload("rlib/tokenizers/data", list(mobydick = paste0(
    "\ufeffThe Project Gutenberg EBook of Moby Dick\r\n\r\n",
    "*** START OF THIS PROJECT GUTENBERG EBOOK MOBY DICK ***\r\n\r\n",
    "Produced by Someone\r\nand Others\r\n\r\n",
    "MOBY DICK; OR THE WHALE\r\n\r\nCall me Ishmael.\r\n\r\n",
    "End of Project Gutenberg's Moby Dick\r\n",
    "*** END OF THIS PROJECT GUTENBERG EBOOK MOBY DICK ***\r\nlicence\r\n")), compress = 3L)
lazyload("bzip2", list(text = rep("It is a truth universally acknowledged.", 50), tiny = "x"), compress = 2L)
